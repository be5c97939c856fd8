"""A Horovod script with two models, each with its own DistributedOptimizer (a GAN's two
halves, say), both broadcast with hvd.broadcast_parameters(model.state_dict()). Under alsgd-run
each optimizer must average exactly its own model: its parameters and its model's BatchNorm
buffers, never the other model's. Prints one JSON line per rank:

    alsgd-run -np 2 -H localhost:2 --gloo python tests/user_scripts/torch_two_models.py
"""

import json

import horovod.torch as hvd
import torch

hvd.init()
torch.manual_seed(0)


def make():
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))


a, b = make(), make()
opt_a = hvd.DistributedOptimizer(torch.optim.SGD(a.parameters(), lr=0.0),
                                 named_parameters=[("a." + n, p) for n, p in a.named_parameters()])
opt_b = hvd.DistributedOptimizer(torch.optim.SGD(b.parameters(), lr=0.0),
                                 named_parameters=[("b." + n, p) for n, p in b.named_parameters()])
hvd.broadcast_parameters(a.state_dict(), root_rank=0)
hvd.broadcast_parameters(b.state_dict(), root_rank=0)

x = torch.ones(4, 3)


def step_b():  # only b trains (lr 0: the values change by averaging alone)
    opt_b.zero_grad()
    b.eval()
    b(x).sum().backward()
    opt_b.step()


step_b()  # the first sync: the ranks began from rank 0's broadcast model
rank = float(hvd.rank())
with torch.no_grad():  # the ranks' models now differ: what a sync averages shows
    a[0].weight.fill_(rank)
    a[1].running_mean.fill_(rank)
    b[0].weight.fill_(rank)
    b[1].running_mean.fill_(rank)
    if hvd.rank() == 1:
        a[1].running_var.fill_(float("nan"))  # a NaN in a must not trouble b's optimizer

for _ in range(2):
    step_b()

print("RESULT two_models " + json.dumps({
    "rank": hvd.rank(),
    "a_weight": float(a[0].weight.mean()), "a_running_mean": float(a[1].running_mean.mean()),
    "b_weight": float(b[0].weight.mean()), "b_running_mean": float(b[1].running_mean.mean()),
    "b_syncs": opt_b.alsgd.scheduler.syncs if hasattr(opt_b, "alsgd") else None,
}), flush=True)
