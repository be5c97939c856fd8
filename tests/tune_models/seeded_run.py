"""A short torch job whose scheduler is seeded from a profile (ALSGD_PROFILE): rank 0 prints
its scheduler's first periods and decision."""

import json

import horovod.torch as hvd
import torch
from models import mlp_1m

import adaptive_lsgd.integrations.torch as alsgd

hvd.init()
torch.set_num_threads(1)
model, loss_fn, (x, y) = mlp_1m()
opt = alsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3),
                                 named_parameters=model.named_parameters(), model=model)
sched = opt.alsgd.scheduler
first = {"periods": list(sched.periods), "decision": sched.last_decision}
for _ in range(3):
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
print("RESULT seeded " + json.dumps({"rank": hvd.rank(), **first}), flush=True)
