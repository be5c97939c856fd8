"""The emulated cluster (``adaptive_lsgd.tools.cluster``): namespaces per host, shaped links, a real
Horovod job across them, and teardown on every way out. Needs root and ``ip netns``."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

from adaptive_lsgd.tools import cluster as emu
from adaptive_lsgd.tools.cluster import cli as emu_cli
from adaptive_lsgd.tools.cluster.network import _state_path

PREFIX = emu.PREFIX


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


NEEDS_NETNS = pytest.mark.skipif(not _netns_usable(),
                                 reason="needs root, `ip netns` and `tc` (emulated cluster)")
NEEDS_HOROVOD = pytest.mark.skipif(importlib.util.find_spec("horovod") is None,
                                   reason="Horovod is not installed (rendezvous server)")
pytestmark = pytest.mark.cluster


def leftovers(run_id: str) -> list:
    """Everything of run ``run_id`` still on the machine (namespaces, links, /etc/netns, state)."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = ns + [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    etc = os.listdir(emu.ETC_NETNS) if os.path.isdir(emu.ETC_NETNS) else []
    out = [n for n in names + etc if n.startswith(PREFIX + run_id)]
    if os.path.exists(_state_path(run_id)):
        out.append(_state_path(run_id))
    return sorted(set(out))


@pytest.fixture
def run_id():
    """Unique run ids for one test; whatever they left is removed afterwards, even on failure."""
    made = []

    def make() -> str:
        rid = "t" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))
        made.append(rid)
        return rid

    yield make
    for rid in made:
        if _netns_usable():
            emu.cleanup_stale(run_id=rid, force=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


HVD_JOB = textwrap.dedent("""
    import json, os, socket
    import torch
    import horovod.torch as hvd
    hvd.init()
    total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1), 1.0]), op=hvd.Sum)
    host = socket.gethostname()
    print("RESULT " + json.dumps({
        "rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
        "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
        "hostname": os.environ["HOROVOD_HOSTNAME"], "uts": host, "addr": socket.gethostbyname(host),
        "netns": os.readlink("/proc/self/ns/net"), "sum": total.tolist(),
        "emu_host": int(os.environ["_ALSGD_EMU_HOST"]),
        "slowdown": float(os.environ["_ALSGD_EMU_SLOWDOWN"])}), flush=True)
""")


@NEEDS_NETNS
@NEEDS_HOROVOD
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_horovod_job_on_2x2_cluster(tmp_path, run_id, capsys):
    script = tmp_path / "job.py"
    script.write_text(HVD_JOB)
    rid = run_id()
    with emu.EmulatedCluster(hosts=2, workers_per_host=2, rate_mbit=[200, 200], slowdown=[1.0, 2.0],
                             run_id=rid) as cluster:
        assert leftovers(rid)
        result = cluster.run([sys.executable, str(script)], cwd=REPO, timeout=180,
                             env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
        addrs = [cluster.host_address(h) for h in range(2)]
        names = [cluster.namespace(h) for h in range(2)]
    assert result.ok, result.output[-4000:]
    assert leftovers(rid) == []
    rows = {}
    for rank, stream, text in result.lines:
        if stream == "stdout" and text.startswith("RESULT "):
            rows[rank] = json.loads(text.split(" ", 1)[1])
    assert sorted(rows) == [0, 1, 2, 3], result.output[-4000:]
    for rank, row in rows.items():
        host = rank // 2
        assert row["rank"] == rank and row["size"] == 4
        assert row["local_rank"] == rank % 2 and row["local_size"] == 2
        assert row["cross_rank"] == host
        assert row["hostname"] == row["uts"] == names[host]
        assert row["addr"] == addrs[host]  # the host name resolves to the host's own address
        assert row["emu_host"] == host and row["slowdown"] == [1.0, 2.0][host]
        assert row["sum"] == [1.0 + 2 + 3 + 4, 4.0]
    # workers of one host share a namespace; the two hosts do not
    assert rows[0]["netns"] == rows[1]["netns"] != rows[2]["netns"] == rows[3]["netns"]
    # the output is echoed as horovodrun does it
    assert "[2]<stdout>:RESULT " in capsys.readouterr().out
    assert "[3]<stdout>:RESULT " in result.output


XFER = textwrap.dedent("""
    import os, socket, sys, time
    rank, addr, port, n = int(os.environ["HOROVOD_RANK"]), sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if rank == 0:
        srv = socket.create_server((addr, port))
        conn, _ = srv.accept()
        got = 0
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            got += len(data)
        conn.sendall(b"k")
        print("RECEIVED", got, flush=True)
    else:
        for _ in range(200):
            try:
                conn = socket.create_connection((addr, port))
                break
            except OSError:
                time.sleep(0.02)
        t0 = time.perf_counter()
        conn.sendall(b"x" * n)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b"k"
        print("XFER %.4f" % (time.perf_counter() - t0), flush=True)
""")


@NEEDS_NETNS
@NEEDS_HOROVOD
def test_link_shaping_slows_inter_host_transfers(tmp_path, run_id):
    script = tmp_path / "xfer.py"
    script.write_text(XFER)
    nbytes = 2_000_000
    rid = run_id()
    times = {}
    with emu.EmulatedCluster(hosts=2, workers_per_host=1, run_id=rid, echo=False) as cluster:
        for label, rate in (("unshaped", None), ("1000", 1000), ("20", 20)):
            for host in range(2):
                cluster.set_rate(host, rate)
            assert cluster.rate_mbit == [rate, rate]
            cmd = [sys.executable, str(script), cluster.host_address(0), "23456", str(nbytes)]
            result = cluster.run(cmd, timeout=60)
            assert result.ok, result.output
            assert f"RECEIVED {nbytes}" in result.stdout[0]
            times[label] = float(result.stdout[1].split()[1])
        # a schedule changes a link's rate during a run, on both ends of the link
        result = cluster.run(["sleep", "1.0"], schedule=[(0.2, 1, 5)], timeout=30)
        assert result.ok and cluster.rate_mbit == [20, 5]
        inside = subprocess.run(["tc", "-n", cluster.namespace(1), "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True).stdout
        outside = subprocess.run(["tc", "qdisc", "show", "dev", cluster.veth(1)],
                                 capture_output=True, text=True).stdout
        assert "tbf" in inside and "5Mbit" in inside and "5Mbit" in outside
    assert leftovers(rid) == []
    print(f"2 MB between hosts: {times}")
    ideal = nbytes * 8 / 20e6  # 0.8 s at 20 Mbit/s
    assert times["20"] >= 0.6 * ideal, times
    assert times["20"] >= 3 * max(times["unshaped"], times["1000"]), times


def _cli(rid: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adaptive_lsgd.tools.cluster", "--hosts", "2", "--workers-per-host",
           "2", "--run-id", rid, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_workers(rid: str, hosts: int, per_host: int, proc: subprocess.Popen) -> list:
    """Pids of the workers in the run's namespaces, once all are up."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        pids = []
        for h in range(hosts):
            out = subprocess.run(["ip", "netns", "pids", f"{PREFIX}{rid}h{h}"], capture_output=True,
                                 text=True).stdout
            pids += [int(p) for p in out.split()]
        if len(pids) >= hosts * per_host:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"workers of {rid} did not start")


@NEEDS_NETNS
@NEEDS_HOROVOD
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_tears_everything_down(sig, run_id):
    rid = run_id()
    proc = _cli(rid, "--", "sleep", "60")
    try:
        workers = _wait_for_workers(rid, 2, 2, proc)
        assert leftovers(rid)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert "torn down" in err and "Traceback" not in err, err
    assert leftovers(rid) == []
    assert not any(_alive(p) for p in workers)


@NEEDS_NETNS
def test_exception_inside_with_tears_everything_down(run_id):
    rid = run_id()
    with pytest.raises(RuntimeError, match="boom"):
        with emu.EmulatedCluster(hosts=2, workers_per_host=1, rate_mbit=50, run_id=rid,
                                 echo=False) as cluster:
            proc = cluster.popen(0, ["sleep", "60"])
            assert len(leftovers(rid)) >= 5  # 2 namespaces, bridge, 2 veths, /etc/netns, state
            raise RuntimeError("boom")
    assert proc.poll() is not None
    assert leftovers(rid) == []


@NEEDS_NETNS
@NEEDS_HOROVOD
def test_worker_failure_and_timeout_stop_the_job(run_id):
    rid = run_id()
    with emu.EmulatedCluster(hosts=2, workers_per_host=1, run_id=rid, echo=False) as cluster:
        failing = ["sh", "-c", 'if [ "$HOROVOD_RANK" = 1 ]; then echo bye; exit 3; fi; sleep 60']
        result = cluster.run(failing, timeout=60)
        assert result.returncodes[1] == 3 and result.returncodes[0] != 0
        assert result.elapsed < 15 and not result.ok and "[1]<stdout>:bye" in result.output
        result = cluster.run(["sleep", "60"], timeout=1.0)
        assert result.timed_out and not result.ok and result.elapsed < 15
    assert leftovers(rid) == []


@NEEDS_NETNS
@NEEDS_HOROVOD
def test_cleanup_after_a_killed_launcher(run_id):
    rid = run_id()
    proc = _cli(rid, "--", "sleep", "60")
    try:
        workers = _wait_for_workers(rid, 2, 2, proc)
        proc.kill()  # SIGKILL: no teardown can run
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)  # PR_SET_PDEATHSIG took the workers with it
    assert leftovers(rid)  # the network is still there ...
    cli = subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cluster", "--cleanup", "--run-id",
                          rid], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and f"{PREFIX}{rid}br" in cli.stdout, cli.stdout + cli.stderr
    assert leftovers(rid) == []  # ... until --cleanup removes it


def _nobody_can_run_python() -> bool:
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", "import adaptive_lsgd.tools.cluster"],
                           capture_output=True, cwd="/", env={**os.environ, "HOME": "/tmp"})
    return probe.returncode == 0


def _cli_as_nobody_in_fork(argv: list) -> tuple:
    """Run ``main(argv)`` in a forked child that dropped root; return (exit code, stderr)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(read_fd)
            os.dup2(write_fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = os.fdopen(2, "w")
            code = emu_cli.main(argv)
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_not_root_gives_one_line_error():
    argv = ["--hosts", "2", "--", "true"]
    if os.geteuid() != 0:
        proc = subprocess.run([sys.executable, "-m", "adaptive_lsgd.tools.cluster", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        code, err = proc.returncode, proc.stderr
    elif _nobody_can_run_python():
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-m", "adaptive_lsgd.tools.cluster", *argv],
                              cwd="/", env={**os.environ, "HOME": "/tmp"}, capture_output=True,
                              text=True, timeout=60)
        code, err = proc.returncode, proc.stderr
    elif hasattr(os, "fork"):
        # nobody cannot reach this interpreter (e.g. it lives under /root): drop root in a fork
        code, err = _cli_as_nobody_in_fork(argv)
    else:
        pytest.skip("cannot drop root here")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "root" in lines[0] and "Traceback" not in err
