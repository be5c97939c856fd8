"""Framework integrations (PyTorch, TensorFlow) over Horovod."""
