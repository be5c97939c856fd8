"""A Horovod script that uses nothing alsgd-run can wrap: it averages a tensor with
hvd.allreduce and prints deterministic lines, so its output can be compared across launchers.

    horovodrun -np 2 -H localhost:2 --gloo python tests/user_scripts/torch_no_optimizer.py
"""

import os

import horovod.torch as hvd
import torch

hvd.init()
value = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), name="value").item()
print(f"rank {hvd.rank()} of {hvd.size()}: average {value:.2f}", flush=True)
print(f"rank {hvd.rank()}: user sitecustomize {os.environ.get('USER_SITECUSTOMIZE_RAN', 'no')}",
      flush=True)
