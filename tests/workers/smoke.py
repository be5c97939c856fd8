"""Average a tensor through Horovod with one framework (argv[1]: torch or tensorflow)."""
import json
import sys

framework = sys.argv[1]
if framework == "torch":
    import horovod.torch as hvd
    import torch

    hvd.init()
    x = torch.arange(3, dtype=torch.float32) + hvd.rank()
    avg = hvd.allreduce(x, op=hvd.Average).tolist()
    total = hvd.allreduce(x, op=hvd.Sum).tolist()
else:
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    x = tf.range(3, dtype=tf.float32) + float(hvd.rank())
    avg = hvd.allreduce(x, op=hvd.Average).numpy().tolist()
    total = hvd.allreduce(x, op=hvd.Sum).numpy().tolist()
loaded = [m for m in ("torch", "tensorflow") if m in sys.modules]
assert loaded == [framework], loaded
print("RESULT smoke " + json.dumps({"framework": framework, "size": hvd.size(), "rank": hvd.rank(),
                                    "average": avg, "sum": total}), flush=True)
