"""hvd.init() before importing the integration (so Horovod runs without dynamic process sets)
and a topology that needs a set of ranks 0 and 1: a clear error on every rank."""

from __future__ import annotations

import json
import os

import horovod.tensorflow as hvd

os.environ.pop("HOROVOD_DYNAMIC_PROCESS_SETS", None)
hvd.init()

import adaptive_lsgd.integrations.tensorflow as alsgd  # noqa: E402

try:
    alsgd.LocalSGD(config={"topology": [[0, 1], [2]], "policy": "fixed", "periods": [2, 2]})
    error = None
except RuntimeError as exc:
    error = str(exc)
print("RESULT no_dynamic " + json.dumps({"rank": hvd.rank(), "error": error}), flush=True)
