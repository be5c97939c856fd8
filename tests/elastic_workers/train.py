"""An elastic PyTorch job for tests/test_elastic.py, run by ``horovodrun`` in elastic mode.

Settings come from ``EL_*`` environment variables (horovodrun swallows worker flags):
``EL_DIR`` (output folder), ``EL_STEPS``, ``EL_COMMIT`` (commit every k steps), ``EL_KILL_STEP``
and ``EL_KILL_HOST`` (the worker on that host SIGKILLs itself once, on its first life, when
``state.batch`` reaches the step), or ``EL_REMOVE_STEP`` (rank 0 then drops the last one-slot
host, or ``EL_REMOVE_HOST``, from ``EL_DIR/hosts``, which the discovery script prints: a
graceful removal), and/or ``EL_ADD_STEP`` and ``EL_ADD_HOST`` (rank 0 adds that ``host:slots``
line: new workers join; after a removal, the host comes back), ``EL_CONFIG``
(the adaptive-lsgd config, JSON). With ``EL_PLAIN=1`` it is an unmodified Horovod script
(``hvd.DistributedOptimizer``; ``alsgd-run`` swaps in adaptive-lsgd's and sets the config).
Every survivor prints ``RESULT elastic <json>``: its commits, resets, the scheduler right after
each reset and one row per step saying which level synced and whether the models then agree.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import time
import zlib

PLAIN = os.environ.get("EL_PLAIN") == "1"
if not PLAIN:  # before hvd.init(): dynamic process sets
    alsgd = importlib.import_module("adaptive_lsgd.integrations.torch")

import horovod.torch as hvd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from horovod.common.exceptions import HorovodInternalError  # noqa: E402

hvd.init()
torch.set_num_threads(1)
OUT = os.environ["EL_DIR"]
STEPS, COMMIT = int(os.environ["EL_STEPS"]), int(os.environ["EL_COMMIT"])
KILL_STEP, KILL_HOST = int(os.environ.get("EL_KILL_STEP", -1)), os.environ.get("EL_KILL_HOST")
REMOVE_STEP = int(os.environ.get("EL_REMOVE_STEP", -1))
REMOVE_HOST = os.environ.get("EL_REMOVE_HOST")
ADD_STEP = int(os.environ.get("EL_ADD_STEP", -1))
HOST = os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()
ME = f"{HOST}.{os.getpid()}"
config = {**json.loads(os.environ.get("EL_CONFIG", "{}")), "log": f"{OUT}/decisions.{ME}.{{rank}}.jsonl"}

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
if PLAIN:
    optimizer = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters())
else:
    optimizer = alsgd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), model=model,
                                           config=config)
state = hvd.elastic.TorchState(model=model, optimizer=optimizer, batch=0)
record = {"host": HOST, "pid": os.getpid(), "commits": {}, "resets": [], "after_reset": [], "rows": []}


def on_reset():
    record["resets"].append({"batch": state.batch, "size": hvd.size(), "rank": hvd.rank(),
                             "time": time.time()})


state.register_reset_callbacks([on_reset])


def params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def crc() -> int:
    return zlib.crc32(params().numpy().tobytes())


def view(sched) -> dict:
    return {"step": sched.step, "phase": sched.phase, "periods": list(sched.periods),
            "switch_step": sched.switch_step, "size": sched.size,
            "levels": sched.topology.describe()["levels"],
            "outer": None if sched.outer is None else {
                "steps": sched.outer.steps, "ready": sched.outer.ready,
                "crc": None if not sched.outer.ready else zlib.crc32(
                    torch.cat([t.reshape(-1) for t in sched.outer.prev]).numpy().tobytes())}}


def batch(step: int):
    """This host's data for a step: a replayed step sees the same batch."""
    g = torch.Generator().manual_seed(step * 1000 + zlib.crc32(HOST.encode()) % 1000)
    x = torch.randn(16, 8, generator=g)
    return x, (x[:, 0] * 3).long().clamp(-1, 1) + 1


def remove_host(rank_hosts: list) -> None:
    """Drop a one-slot host from the discovery list, the one holding the last rank if it has
    one slot (the other blocks then keep their rank tuples: the same process sets must be
    made anew in the new Horovod world)."""
    single = [h for h in rank_hosts if rank_hosts.count(h) == 1]
    gone = REMOVE_HOST or (rank_hosts[-1] if rank_hosts[-1] in single else single[-1])
    with open(f"{OUT}/hosts", encoding="utf-8") as fh:
        lines = [line for line in fh.read().split() if line.split(":")[0] != gone]
    with open(f"{OUT}/hosts.new", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(f"{OUT}/hosts.new", f"{OUT}/hosts")
    open(f"{OUT}/removed", "w").close()
    print(f"REMOVING {gone} at batch {state.batch}", flush=True)


def sets_registered(rt) -> bool:
    """Every process set the runtime syncs over is registered in this Horovod world."""
    table = hvd.mpi_ops._basics._get_process_set_ids_and_ranks()
    return all(table.get(ps.process_set_id) == list(ps.ranks) for ps in rt.process_sets.values())


ROWS_TIMEOUT_S = 30.0


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's parameters, gathered after each step. Named: ranks outside a level-0
    process set issue fewer collectives, so Horovod's automatic names would differ. With a
    deadline: in Horovod 0.28.1 a collective enqueued just as the background thread shuts
    down after a peer's failure never completes (the thread is gone, the handle is never
    marked done, ``synchronize`` spins forever; seen here in about 1 of 12 worker-kill runs).
    A survivor stuck so raises HorovodInternalError, which the elastic wrapper answers with
    the reset the other survivors already made. The lost collective's name stays in Horovod's
    tensor table after the reset, so the name carries the Horovod world (rank 0's count, which
    a joining worker gets too), as the integration's gradient names do."""
    handle = hvd.allgather_async(t, name=f"el.rows.w{optimizer.alsgd.world}")
    deadline = time.monotonic() + ROWS_TIMEOUT_S
    while not hvd.poll(handle):
        if time.monotonic() > deadline:
            raise HorovodInternalError(f"el.rows: no answer within {ROWS_TIMEOUT_S:.0f} s")
        time.sleep(0.001)
    return hvd.synchronize(handle)


@hvd.elastic.run
def train(state):
    # After a reset, or on a worker that joined a running job (its state came from rank 0).
    after_reset = len(record["after_reset"]) < len(record["resets"]) or (
        state.batch > 0 and not record["rows"])
    while state.batch < STEPS:
        if state.batch == KILL_STEP and HOST == KILL_HOST and not os.path.exists(f"{OUT}/killed"):
            open(f"{OUT}/killed", "w").close()
            print(f"KILLING {ME} at batch {state.batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if state.batch == REMOVE_STEP and hvd.rank() == 0 and not os.path.exists(f"{OUT}/removed"):
            remove_host(optimizer.alsgd.topology.hosts)
        if state.batch == ADD_STEP and hvd.rank() == 0 and not os.path.exists(f"{OUT}/added"):
            with open(f"{OUT}/hosts", "a", encoding="utf-8") as fh:
                fh.write(os.environ["EL_ADD_HOST"] + "\n")
            open(f"{OUT}/added", "w").close()
            print(f"ADDING {os.environ['EL_ADD_HOST']} at batch {state.batch}", flush=True)
        started_here = not record["rows"] or record["rows"][0]["batch"] == 1
        changes = sum(1 for s in (REMOVE_STEP, ADD_STEP) if 0 <= s < state.batch)
        if started_here and len(record["resets"]) < changes:
            time.sleep(0.2)  # give Horovod's discovery (polled every second) time to notice
        before = crc()
        x, y = batch(state.batch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # the hooks rebuild after a reset
        sched = optimizer.alsgd.scheduler
        if after_reset:
            record["after_reset"].append({"batch": state.batch, "crc": before, "rank": hvd.rank(),
                                          "scheduler": view(sched),
                                          "sets": [list(r) for r in optimizer.alsgd.process_sets],
                                          "sets_registered": sets_registered(optimizer.alsgd)})
            after_reset = False
        syncs = list(sched.syncs)
        optimizer.step()
        sched = optimizer.alsgd.scheduler
        state.batch += 1
        changed = [lvl for lvl, (a, b) in enumerate(zip(syncs, sched.syncs)) if b != a]
        level = max(changed) if changed else None
        rows = gather_rows(params().unsqueeze(0))
        block = sched.topology.block_of(level, hvd.rank()) if level is not None else ()
        record["rows"].append({"batch": state.batch, "step": sched.step, "size": hvd.size(),
                               "level": level, "phase": sched.phase,
                               "all_equal": bool((rows == rows[0]).all()),
                               "block_equal": all(torch.equal(rows[r], rows[block[0]]) for r in block)})
        if state.batch % COMMIT == 0:
            record["commits"][state.batch] = {"crc": crc(), "rank": hvd.rank(),
                                              "scheduler": view(sched)}
            state.commit()


train(state)
optimizer.average_now()
final_rows = hvd.allgather(params().unsqueeze(0), name="el.final")
record.update(final=view(optimizer.alsgd.scheduler), batch=state.batch, rank=hvd.rank(),
              size=hvd.size(), final_equal=bool((final_rows == params()).all()),
              summary=importlib.import_module("adaptive_lsgd.integrations.torch").summary(optimizer))
print("RESULT elastic " + json.dumps(record), flush=True)
