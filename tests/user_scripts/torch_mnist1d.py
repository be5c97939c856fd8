"""A PyTorch Horovod script written the way Horovod's examples/pytorch/pytorch_mnist.py is,
on MNIST-1D: DistributedSampler, broadcast_parameters, broadcast_optimizer_state,
hvd.DistributedOptimizer and an LR scheduler. It knows nothing of adaptive-lsgd.

    horovodrun -np 2 -H localhost:2 --gloo python tests/user_scripts/torch_mnist1d.py
"""

import argparse
import json

import horovod.torch as hvd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed

from adaptive_lsgd.tools.demo.datasets import load_mnist1d

parser = argparse.ArgumentParser(description="PyTorch MNIST-1D Example")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--lr", type=float, default=0.025)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--seed", type=int, default=42)
args = parser.parse_args()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 10, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x.unsqueeze(1)))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


hvd.init()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

data = load_mnist1d()
train_dataset = torch.utils.data.TensorDataset(torch.from_numpy(data["x"]), torch.from_numpy(data["y"]))
train_sampler = torch.utils.data.distributed.DistributedSampler(
    train_dataset, num_replicas=hvd.size(), rank=hvd.rank())
train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
test_dataset = torch.utils.data.TensorDataset(torch.from_numpy(data["x_test"]),
                                              torch.from_numpy(data["y_test"]))
test_sampler = torch.utils.data.distributed.DistributedSampler(
    test_dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=1000, sampler=test_sampler)

model = Net()
lr_scaler = hvd.size()
optimizer = optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

# Horovod: wrap optimizer with DistributedOptimizer.
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     op=hvd.Average)
scheduler = optim.lr_scheduler.StepLR(optimizer, step_size=args.epochs - 1, gamma=0.2)


def train(epoch):
    model.train()
    train_sampler.set_epoch(epoch)
    for data, target in train_loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
    if hvd.rank() == 0:
        print(f"Train Epoch: {epoch} loss {loss.item():.4f}", flush=True)


def metric_average(val, name):
    return hvd.allreduce(torch.tensor(val), name=name).item()


def test():
    model.eval()
    correct = 0.0
    with torch.no_grad():
        for data, target in test_loader:
            correct += model(data).argmax(1).eq(target).float().sum().item()
    accuracy = metric_average(correct / len(test_sampler), "avg_accuracy")
    if hvd.rank() == 0:
        print("RESULT accuracy " + json.dumps({"test_acc": accuracy}), flush=True)


for epoch in range(args.epochs):
    train(epoch)
    scheduler.step()
test()
