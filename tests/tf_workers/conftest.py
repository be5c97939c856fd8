"""The scripts here run only under horovodrun (tests/test_tensorflow.py launches them).
Importing one in the pytest process, as ``--doctest-modules`` collection would, starts Horovod
and TensorFlow there (beside horovod.torch): keep pytest out of this folder."""

collect_ignore_glob = ["*.py"]
