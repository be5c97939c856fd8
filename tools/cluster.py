"""An emulated multi-host Horovod cluster on one machine (network namespaces, veth, bridge, tc).

Each emulated host is a network namespace ``alsgd<run>h<i>`` whose ``eth0`` is one end of a veth
pair; the other end (``alsgd<run>v<i>``) hangs on a Linux bridge ``alsgd<run>br`` in the root
namespace. The bridge and the hosts share a private ``10.213.<x>.0/24`` that is picked so that
nothing else on the machine uses it. A host's link is shaped with ``tc ... tbf`` in both
directions (egress of ``eth0`` inside the namespace is the host's upload, egress of the bridge-side
veth its download), so traffic between hosts crosses two shaped links while the workers of one
host, which share its namespace, talk over loopback at full speed.

Horovod's Gloo rendezvous server runs in the root namespace, bound to the bridge address, and
each worker starts with ``ip netns exec <ns> <command>`` and the variables ``horovodrun --gloo``
would give it (``HOROVOD_RANK``, ``HOROVOD_SIZE``, ``HOROVOD_LOCAL_RANK``, ...). A mixed cluster
is emulated with a per-host compute slowdown that workers read from ``_ALSGD_EMU_SLOWDOWN``
(and the host index from ``_ALSGD_EMU_HOST``; see :func:`emulated_slowdown`). The leading
underscore keeps them out of the ``ALSGD_*`` namespace that the core parses as configuration.

Each worker also gets its own UTS namespace whose hostname is its host's name, and each namespace
an ``/etc/netns/<ns>/hosts`` (bind-mounted over ``/etc/hosts`` by ``ip netns exec``) in which the
host names resolve to the host addresses. Besides being closer to a real cluster, this is needed:
Horovod 0.28.1 ignores ``HOROVOD_GLOO_IFACE`` when it builds the Gloo context of a process set
(the global set included, so every job) and resolves the hostname instead, which on one machine
is 127.0.0.1 and makes the ranks of different namespaces unable to connect.

Everything is removed again on every way out (normal exit, exception, Ctrl-C, SIGTERM, worker
failure, timeout); :func:`cleanup_stale` (``--cleanup``) removes what a killed launcher left.
Root is required.

Command line::

    python -m adaptive_lsgd.tools.cluster --hosts 2 --workers-per-host 2 --rate-mbit 100 \\
        --slowdown 1,2 --schedule 10:0:10,30:0:100 -- python train.py
    python -m adaptive_lsgd.tools.cluster --cleanup

``--schedule 10:0:10`` sets host 0's link to 10 Mbit/s 10 s after the workers start.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Optional, Union

PREFIX = "alsgd"
STATE_DIR = "/run/alsgd-cluster"
ETC_NETNS = "/etc/netns"  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
SUBNET_PREFIX = "10.213"
HOST_IFACE = "eth0"
ENV_SLOWDOWN = "_ALSGD_EMU_SLOWDOWN"
ENV_HOST = "_ALSGD_EMU_HOST"
MAX_HOSTS = 200
_RUN_ID_RE = re.compile(r"^[a-z0-9]{1,6}$")
# alsgd<run>h<i> (namespace), alsgd<run>v<i> / alsgd<run>p<i> (veth ends), alsgd<run>br (bridge)
_NAME_RE = re.compile(r"^" + PREFIX + r"([a-z0-9]+?)(?:[hvp]\d+|br)$")
_TBF_LATENCY = "100ms"

Rate = Optional[float]


class ClusterError(RuntimeError):
    """The emulated cluster could not be set up or used (the message is one line)."""


class NotRootError(ClusterError):
    """The emulated cluster needs root (network namespaces, veth pairs, tc)."""


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM/SIGHUP arrives while a cluster is up."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def emulated_slowdown(default: float = 1.0) -> float:
    """The compute slowdown factor of this worker's emulated host (1.0 outside a cluster)."""
    value = os.environ.get(ENV_SLOWDOWN)
    return float(value) if value else default


def emulated_host() -> Optional[int]:
    """The index of this worker's emulated host, or ``None`` outside an emulated cluster."""
    value = os.environ.get(ENV_HOST)
    return int(value) if value else None


# ----------------------------------------------------------------------------------------------
# Small helpers around ip / tc


def _cmd(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().replace("\n", " ")
        raise ClusterError(f"`{' '.join(args)}` failed: {msg}")
    return proc


def require_root() -> None:
    """Raise :class:`NotRootError` / :class:`ClusterError` unless ``ip netns`` and tc can be used."""
    if os.geteuid() != 0:
        raise NotRootError("the emulated cluster needs root (it creates network namespaces, veth pairs "
                           "and tc qdiscs); run it as root, e.g. with sudo")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ClusterError(f"the emulated cluster needs `{tool}` (iproute2) on PATH")
    probe = _cmd(["ip", "netns", "list"], check=False)
    if probe.returncode != 0:
        raise ClusterError(f"`ip netns` is not usable here: {probe.stderr.strip()}")


def _netns_names() -> list:
    out = _cmd(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list:
    out = _cmd(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _etc_names() -> list:
    try:
        return sorted(os.listdir(ETC_NETNS))
    except OSError:
        return []


def _ours(names: Sequence[str], run_id: Optional[str] = None) -> list:
    out = []
    for name in names:
        m = _NAME_RE.match(name)
        if m and (run_id is None or m.group(1) == run_id):
            out.append(name)
    return out


def _kill_netns_pids(ns: str, sig: int = signal.SIGKILL) -> None:
    """Kill the processes inside one of *our* namespaces (all of them were started by us)."""
    out = _cmd(["ip", "netns", "pids", ns], check=False).stdout
    for tok in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(tok), sig)


def _proc_start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _state_path(run_id: str) -> str:
    return os.path.join(STATE_DIR, f"{run_id}.json")


def _owner_alive(run_id: str) -> bool:
    try:
        with open(_state_path(run_id)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    start = _proc_start_time(int(state.get("pid", -1)))
    return start is not None and start == state.get("start")


@contextlib.contextmanager
def _state_lock():
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(os.path.join(STATE_DIR, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_run(run_id: str, names_ns: Sequence[str], names_links: Sequence[str]) -> list:
    """Remove the given namespaces and links of one run; return what was removed."""
    removed = []
    for ns in names_ns:
        _kill_netns_pids(ns)
    # The bridge-side veth ends first (deleting one end deletes its peer), then namespaces, bridge.
    for link in sorted(names_links, key=lambda n: n.endswith("br")):
        if _cmd(["ip", "link", "del", link], check=False).returncode == 0:
            removed.append(link)
    for ns in names_ns:
        if _cmd(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(ns)
    # Namespace teardown in the kernel is asynchronous: wait until the names are really gone.
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        left = _ours(_netns_names() + _link_names(), run_id)
        if not left:
            break
        for link in left:
            if link in _link_names():
                _cmd(["ip", "link", "del", link], check=False)
            if link in _netns_names():
                _cmd(["ip", "netns", "del", link], check=False)
        time.sleep(0.1)
    for name in _ours(_etc_names(), run_id):
        shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
        removed.append(os.path.join(ETC_NETNS, name))
    with contextlib.suppress(OSError):
        os.unlink(_state_path(run_id))
    return removed


def cleanup_stale(run_id: Optional[str] = None, force: bool = False) -> list:
    """Remove namespaces, veths and bridges (``alsgd`` prefix only) that crashed runs left.

    A run whose launcher is still alive is left alone unless ``force``. ``run_id`` restricts the
    clean-up to one run. Returns the names that were removed.
    """
    require_root()
    ns_all, links_all = _ours(_netns_names(), run_id), _ours(_link_names(), run_id)
    runs = {_NAME_RE.match(n).group(1) for n in ns_all + links_all + _ours(_etc_names(), run_id)}
    if os.path.isdir(STATE_DIR):
        for fname in os.listdir(STATE_DIR):
            rid = fname[:-5] if fname.endswith(".json") else None
            if rid and (run_id is None or rid == run_id):
                runs.add(rid)
    removed = []
    for rid in sorted(runs):
        if not force and _owner_alive(rid):
            continue
        removed += _remove_run(rid, _ours(ns_all, rid), _ours(links_all, rid))
    return removed


# ----------------------------------------------------------------------------------------------
# The cluster


@dataclass
class RunResult:
    """What :meth:`EmulatedCluster.run` returns: per-rank exit codes and captured output."""

    returncodes: list
    stdout: list
    stderr: list
    lines: list = field(default_factory=list)  # (rank, "stdout" | "stderr", text) in arrival order
    elapsed: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    @property
    def output(self) -> str:
        """All worker lines as horovodrun prints them: ``[rank]<stdout>:text``."""
        return "".join(f"[{rank}]<{stream}>:{text}\n" for rank, stream, text in self.lines)


def _per_host(value, hosts: int, name: str, cast) -> list:
    if value is None or isinstance(value, (int, float, str)):
        values = [value] * hosts
    else:
        values = list(value)
    if len(values) != hosts:
        raise ValueError(f"{name}: expected one value or {hosts} values, got {len(values)}")
    return [None if v is None else cast(v) for v in values]


def _rate(value) -> Rate:
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "off", "0")):
        return None
    value = float(value)
    if value < 0:
        raise ValueError(f"a rate must be positive (Mbit/s), got {value}")
    return value or None


_LIBC = None
_CLONE_NEWUTS = 0x04000000


def _load_libc():
    global _LIBC
    if _LIBC is None:
        with contextlib.suppress(Exception):
            _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _child_setup(hostname: bytes):
    """What a worker does between fork and exec (no allocation-heavy Python in there).

    It dies with SIGKILL when the launching thread dies (``PR_SET_PDEATHSIG``) and gets its own
    UTS namespace whose hostname is its emulated host's name.
    """
    libc = _load_libc()

    def setup() -> None:
        if libc is None:
            return
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if libc.unshare(_CLONE_NEWUTS) == 0:
            libc.sethostname(hostname, len(hostname))

    return setup


class EmulatedCluster:
    """``hosts`` emulated hosts with ``workers_per_host`` Horovod workers each, on one machine.

    Args:
        hosts: number of emulated hosts (network namespaces).
        workers_per_host: workers per host, one int or one per host.
        rate_mbit: link rate of each host in Mbit/s (one value or one per host); ``None`` or 0
            leaves a link unshaped.
        slowdown: compute slowdown per host (one value or one per host), exported to its workers
            as ``_ALSGD_EMU_SLOWDOWN``.
        schedule: rate changes during :meth:`run`, ``[(t_seconds, host, rate_mbit), ...]``, with
            ``t`` counted from the start of each run and ``rate_mbit=None`` for unshaped.
        run_id: 1-6 characters ``[a-z0-9]`` naming the resources (random by default).
        echo: print worker output as it arrives (``[rank]<stdout>:...``) and progress lines.

    Example (as root)::

        from adaptive_lsgd.tools.cluster import EmulatedCluster

        with EmulatedCluster(hosts=2, workers_per_host=2, rate_mbit=[100, 100],
                             slowdown=[1.0, 2.0], schedule=[(10, 1, 10)]) as cluster:
            result = cluster.run(["python", "train.py"], env={"OMP_NUM_THREADS": "1"},
                                 timeout=600)
            cluster.set_rate(0, 50)          # change host 0's link at any time
        print(result.returncodes)            # [0, 0, 0, 0]
        print(result.stdout[0])              # what rank 0 printed

    On leaving the ``with`` block (also by exception, Ctrl-C or SIGTERM) the workers are killed
    and the namespaces, veths and the bridge are deleted.
    """

    def __init__(self, hosts: int = 2, workers_per_host: Union[int, Sequence[int]] = 1,
                 rate_mbit=None, slowdown=None, schedule: Optional[Sequence] = None,
                 run_id: Optional[str] = None, echo: bool = True,
                 out: Optional[IO] = None, err: Optional[IO] = None):
        if not 1 <= int(hosts) <= MAX_HOSTS:
            raise ValueError(f"hosts must be in 1..{MAX_HOSTS}, got {hosts}")
        self.hosts = int(hosts)
        self.workers_per_host = _per_host(workers_per_host, self.hosts, "workers_per_host", int)
        if any(w is None or w < 1 for w in self.workers_per_host):
            raise ValueError("workers_per_host must be >= 1")
        self._rates: list = _per_host(rate_mbit, self.hosts, "rate_mbit", _rate)
        self.slowdown = [1.0 if s is None else s
                         for s in _per_host(slowdown, self.hosts, "slowdown", float)]
        if any(s <= 0 for s in self.slowdown):
            raise ValueError("slowdown factors must be > 0")
        self.schedule = self._check_schedule(schedule or [])
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id must match [a-z0-9]{{1,6}}, got {run_id!r}")
        self.run_id = run_id
        self.echo = echo
        self._out = out
        self._err = err
        self.subnet: Optional[str] = None  # "10.213.x"
        self._started = False
        self._closed = False
        self._procs: list = []
        self._print_lock = threading.Lock()
        self._tc_lock = threading.Lock()
        self._httpd = None
        self._httpd_thread: Optional[threading.Thread] = None
        self._old_handlers: dict = {}

    # -- names and addresses ---------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.run_id}br"

    def namespace(self, host: int) -> str:
        """The network namespace of ``host`` (also its ``HOROVOD_HOSTNAME``)."""
        return f"{PREFIX}{self.run_id}h{self._host(host)}"

    def veth(self, host: int) -> str:
        """The bridge-side end of ``host``'s veth pair, in the root namespace."""
        return f"{PREFIX}{self.run_id}v{self._host(host)}"

    @property
    def bridge_address(self) -> str:
        return f"{self._need_subnet()}.1"

    def host_address(self, host: int) -> str:
        """The IPv4 address of ``host`` (its ``eth0``)."""
        return f"{self._need_subnet()}.{10 + self._host(host)}"

    @property
    def size(self) -> int:
        return sum(self.workers_per_host)

    @property
    def rate_mbit(self) -> list:
        """Current link rate per host in Mbit/s (``None``: unshaped)."""
        return list(self._rates)

    def _host(self, host: int) -> int:
        host = int(host)
        if not 0 <= host < self.hosts:
            raise ValueError(f"host must be in 0..{self.hosts - 1}, got {host}")
        return host

    def _need_subnet(self) -> str:
        if self.subnet is None:
            raise ClusterError("the cluster is not started")
        return self.subnet

    def _check_schedule(self, schedule) -> list:
        out = []
        for item in schedule:
            t, host, rate = item
            if float(t) < 0:
                raise ValueError(f"schedule times must be >= 0, got {t}")
            out.append((float(t), self._host(host), _rate(rate)))
        return sorted(out, key=lambda x: x[0])

    def _log(self, msg: str) -> None:
        if self.echo:
            with self._print_lock:
                stream = self._err or sys.stderr
                stream.write(f"[cluster {self.run_id}] {msg}\n")
                stream.flush()

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def start(self) -> EmulatedCluster:
        """Create namespaces, veths, bridge and qdiscs and start the rendezvous server."""
        if self._started:
            return self
        require_root()
        self._started = True
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            self._setup_network()
            self._start_rendezvous()
        except BaseException:
            self.close()
            raise
        rates = ["-" if r is None else f"{r:g}" for r in self._rates]
        self._log(f"{self.hosts} hosts x {self.workers_per_host} workers, {self.subnet}.0/24, "
                  f"rendezvous {self.bridge_address}:{self._port()}, rates Mbit/s {rates}, "
                  f"slowdown {self.slowdown}")
        return self

    def _setup_network(self) -> None:
        with _state_lock():
            if _ours(_netns_names() + _link_names() + _etc_names(), self.run_id) or os.path.exists(
                    _state_path(self.run_id)):
                raise ClusterError(f"run id {self.run_id!r} is in use (or left over: "
                                   f"`python -m adaptive_lsgd.tools.cluster --cleanup`)")
            self.subnet = self._pick_subnet()
            with open(_state_path(self.run_id), "w") as f:
                json.dump({"pid": os.getpid(), "start": _proc_start_time(os.getpid()),
                           "subnet": self.subnet, "hosts": self.hosts}, f)
            _cmd(["ip", "link", "add", self.bridge, "type", "bridge"])
            _cmd(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        _cmd(["ip", "link", "set", self.bridge, "up"])
        for h in range(self.hosts):
            ns, veth, peer = self.namespace(h), self.veth(h), f"{PREFIX}{self.run_id}p{h}"
            _cmd(["ip", "netns", "add", ns])
            _cmd(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
            _cmd(["ip", "link", "set", peer, "netns", ns])
            _cmd(["ip", "-n", ns, "link", "set", peer, "name", HOST_IFACE])
            _cmd(["ip", "-n", ns, "addr", "add", f"{self.host_address(h)}/24", "dev", HOST_IFACE])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", ns, "link", "set", HOST_IFACE, "up"])
            _cmd(["ip", "link", "set", veth, "master", self.bridge])
            _cmd(["ip", "link", "set", veth, "up"])
            self._apply_rate(h, self._rates[h])
        self._write_hosts_files()

    def _write_hosts_files(self) -> None:
        """Give each namespace an /etc/hosts in which every emulated host name resolves.

        Horovod 0.28.1 ignores ``HOROVOD_GLOO_IFACE`` for process-set contexts and falls back to
        resolving the hostname, which on one machine is 127.0.0.1; with these files (and a
        per-worker UTS namespace) it resolves to the host's own address, as on a real cluster.
        """
        machine = socket.gethostname()
        for h in range(self.hosts):
            lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                     f"{self.host_address(h)}\t{self.namespace(h)} {machine}"]
            lines += [f"{self.host_address(j)}\t{self.namespace(j)}" for j in range(self.hosts) if j != h]
            path = os.path.join(ETC_NETNS, self.namespace(h))
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "hosts"), "w") as f:
                f.write("\n".join(lines) + "\n")

    def _pick_subnet(self) -> str:
        used = _cmd(["ip", "-4", "-o", "addr", "show"], check=False).stdout
        used += _cmd(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
        start = int.from_bytes(self.run_id.encode(), "big") % 250
        for i in range(250):
            x = (start + i) % 250 + 1
            if f"{SUBNET_PREFIX}.{x}." not in used and f"{SUBNET_PREFIX}.{x}/" not in used:
                return f"{SUBNET_PREFIX}.{x}"
        raise ClusterError(f"no free /24 left in {SUBNET_PREFIX}.0.0/16")

    def _start_rendezvous(self) -> None:
        try:
            from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
        except ImportError:  # the network alone still works (popen); run() needs Horovod
            return
        self._httpd = RendezvousHTTPServer((self.bridge_address, 0), RendezvousHandler, 0)
        self._httpd_thread = threading.Thread(target=self._httpd.serve_forever,
                                              name=f"alsgd-rendezvous-{self.run_id}", daemon=True)
        self._httpd_thread.start()

    def _port(self) -> Optional[int]:
        return self._httpd.server_address[1] if self._httpd is not None else None

    def close(self) -> None:
        """Kill the workers, stop the rendezvous server, delete namespaces, veths and bridge.

        Idempotent; SIGINT/SIGTERM are held back while it runs so teardown is not cut short.
        """
        if self._closed or not self._started:
            return
        self._closed = True
        main = threading.current_thread() is threading.main_thread()
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        if main:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        errors, took, t_start = [], [], time.monotonic()
        try:
            for step in (self._kill_workers, self._stop_rendezvous, self._delete_network):
                t0 = time.monotonic()
                try:
                    step()
                except Exception as e:  # keep going: every later step must still run
                    errors.append(f"{step.__name__}: {e}")
                took.append(f"{step.__name__.lstrip('_')} {time.monotonic() - t0:.1f}s")
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
            self._restore_signal_handlers()
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            self._log("teardown problems: " + "; ".join(errors))
        else:
            slow = time.monotonic() - t_start > 2.0
            self._log("torn down" + (f" (slow: {', '.join(took)})" if slow else ""))

    def _stop_rendezvous(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _delete_network(self) -> None:
        run_ns = _ours(_netns_names(), self.run_id)
        run_links = _ours(_link_names(), self.run_id)
        _remove_run(self.run_id, run_ns, run_links)
        left = _ours(_netns_names() + _link_names() + _etc_names(), self.run_id)
        if left:
            raise ClusterError(f"could not remove {left}")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise Terminated(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, old)
        self._old_handlers.clear()

    # -- shaping ---------------------------------------------------------------------------
    def set_rate(self, host: int, rate_mbit: Rate) -> None:
        """Shape ``host``'s link to ``rate_mbit`` Mbit/s in both directions (``None``: unshaped)."""
        host, rate = self._host(host), _rate(rate_mbit)
        if self.subnet is None or self._closed:
            raise ClusterError("the cluster is not running")
        self._apply_rate(host, rate)
        self._rates[host] = rate

    def _apply_rate(self, host: int, rate: Rate) -> None:
        devices = [[], ["-n", self.namespace(host)]]  # bridge-side veth, host's eth0
        names = [self.veth(host), HOST_IFACE]
        with self._tc_lock:
            for netns, dev in zip(devices, names):
                if rate is None:
                    _cmd(["tc", *netns, "qdisc", "del", "dev", dev, "root"], check=False)
                    continue
                kbit = max(1, int(round(rate * 1000)))
                burst = max(64 * 1024, int(rate * 1e6 / 8 / 100))  # >= 10 ms at the rate
                _cmd(["tc", *netns, "qdisc", "replace", "dev", dev, "root", "tbf",
                      "rate", f"{kbit}kbit", "burst", str(burst), "latency", _TBF_LATENCY])

    def _schedule_loop(self, schedule, t0: float, stop: threading.Event) -> None:
        for t, host, rate in schedule:
            if stop.wait(max(0.0, t0 + t - time.monotonic())):
                return
            try:
                self.set_rate(host, rate)
                self._log(f"t={time.monotonic() - t0:.1f}s host {host} -> "
                          f"{'unshaped' if rate is None else f'{rate:g} Mbit/s'}")
            except Exception as e:
                self._log(f"schedule: could not set host {host} to {rate}: {e}")

    # -- processes -------------------------------------------------------------------------
    def popen(self, host: int, command: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``command`` inside ``host``'s namespace (its own process group).

        The process is killed on :meth:`close`, and by the kernel if the thread that started it
        ends (``PR_SET_PDEATHSIG``), so a SIGKILLed launcher leaves no workers behind. Its
        hostname (own UTS namespace) is the namespace's name, which resolves to the host's
        address there.
        Keyword arguments go to :class:`subprocess.Popen`.
        """
        if self.subnet is None or self._closed:
            raise ClusterError("the cluster is not running")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        ns = self.namespace(host)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *command], start_new_session=True,
                                preexec_fn=_child_setup(ns.encode()), **kwargs)
        self._procs.append(proc)
        return proc

    def _kill_workers(self, procs: Optional[list] = None, grace: float = 3.0) -> None:
        """Stop ``procs`` (default: everything, then sweep the namespaces) with SIGTERM, SIGKILL."""
        sweep = procs is None
        procs = self._procs if procs is None else procs
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in live:  # only groups whose leader we saw alive: a reaped pid may be reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the leader or stray children of its group
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)
        self._procs = [p for p in self._procs if p.returncode is None]
        if sweep and self.subnet is not None:
            for h in range(self.hosts):
                _kill_netns_pids(self.namespace(h))

    def slot_env(self, rendezvous: bool = True) -> list:
        """The per-rank variables ``horovodrun --gloo`` would set, one dict per rank."""
        out = []
        rank = 0
        for h, local_size in enumerate(self.workers_per_host):
            for local_rank in range(local_size):
                cross = [i for i, w in enumerate(self.workers_per_host) if w > local_rank]
                env = {
                    "HOROVOD_HOSTNAME": self.namespace(h),
                    "HOROVOD_RANK": str(rank),
                    "HOROVOD_SIZE": str(self.size),
                    "HOROVOD_LOCAL_RANK": str(local_rank),
                    "HOROVOD_LOCAL_SIZE": str(local_size),
                    "HOROVOD_CROSS_RANK": str(cross.index(h)),
                    "HOROVOD_CROSS_SIZE": str(len(cross)),
                    ENV_HOST: str(h),
                    ENV_SLOWDOWN: repr(float(self.slowdown[h])),
                }
                if rendezvous:
                    env.update({
                        "HOROVOD_GLOO_RENDEZVOUS_ADDR": self.bridge_address,
                        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(self._port()),
                        "HOROVOD_CONTROLLER": "gloo",
                        "HOROVOD_CPU_OPERATIONS": "gloo",
                        "HOROVOD_GLOO_IFACE": HOST_IFACE,
                        "NCCL_SOCKET_IFNAME": HOST_IFACE,
                    })
                out.append((h, env))
                rank += 1
        return out

    def _host_alloc_plan(self) -> list:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

        spec = ",".join(f"{self.namespace(h)}:{w}" for h, w in enumerate(self.workers_per_host))
        return get_host_assignments(parse_hosts(spec), self.size)

    def run(self, command: Sequence[str], env: Optional[dict] = None, timeout: Optional[float] = None,
            cwd: Optional[str] = None, schedule: Optional[Sequence] = None,
            terminate_on_failure: bool = True) -> RunResult:
        """Run ``command`` as every rank (``ip netns exec``) and wait; like ``horovodrun --gloo``.

        ``env`` is added to this process's environment. When a rank fails the others are
        terminated (as horovodrun does); after ``timeout`` seconds all are killed and the result
        says ``timed_out``. ``schedule`` overrides the constructor's rate schedule for this run.
        Worker output is echoed with a ``[rank]<stdout>:`` prefix and captured in the result.
        """
        if self.subnet is None or self._closed:
            raise ClusterError("the cluster is not running")
        if self._httpd is None:
            raise ClusterError("Horovod is not importable here, so there is no rendezvous server")
        plan = self._host_alloc_plan()
        self._httpd.init(plan)  # fresh rendezvous scopes for this run
        base = dict(os.environ)
        base.update({k: str(v) for k, v in (env or {}).items()})
        base["PYTHONUNBUFFERED"] = "1"
        slots = self.slot_env()
        expected = [(s.hostname, s.rank, s.size, s.local_rank, s.local_size, s.cross_rank,
                     s.cross_size) for s in plan]
        ours = [(e["HOROVOD_HOSTNAME"], *(int(e["HOROVOD_" + k]) for k in (
            "RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"))) for _, e in slots]
        if ours != expected:  # horovodrun's own assignment is the reference
            raise ClusterError(f"slot assignment differs from horovodrun's: {ours} != {expected}")

        n = len(slots)
        stdout: list = [[] for _ in range(n)]
        stderr: list = [[] for _ in range(n)]
        lines: list = []
        procs: list = []
        pumps: list = []
        stop = threading.Event()
        sched = self._check_schedule(schedule) if schedule is not None else self.schedule
        t0 = time.monotonic()
        timed_out = False
        try:
            for rank, (host, slot) in enumerate(slots):
                wenv = dict(base)
                wenv.update(slot)
                proc = self.popen(host, list(command), env=wenv, cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                procs.append(proc)
                for stream, sink, name in ((proc.stdout, stdout[rank], "stdout"),
                                           (proc.stderr, stderr[rank], "stderr")):
                    t = threading.Thread(target=self._pump, args=(rank, name, stream, sink, lines),
                                         daemon=True)
                    t.start()
                    pumps.append(t)
            self._log(f"started {n} workers: {' '.join(command)}")
            if sched:
                threading.Thread(target=self._schedule_loop, args=(sched, t0, stop),
                                 name=f"alsgd-schedule-{self.run_id}", daemon=True).start()
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if terminate_on_failure and failed:
                    self._log(f"rank {failed[0][0]} exited with {failed[0][1]}; "
                              f"terminating the remaining workers")
                    break
                if timeout is not None and time.monotonic() - t0 > timeout:
                    timed_out = True
                    self._log(f"timeout after {timeout:g}s; killing the workers")
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            self._kill_workers(procs)
            for t in pumps:
                t.join(timeout=2.0)
        result = RunResult(returncodes=[p.returncode for p in procs],
                           stdout=["".join(s) for s in stdout], stderr=["".join(s) for s in stderr],
                           lines=list(lines), elapsed=time.monotonic() - t0, timed_out=timed_out)
        self._log(f"exit codes {result.returncodes} after {result.elapsed:.1f}s")
        return result

    def _pump(self, rank: int, name: str, stream, sink: list, lines: list) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                text = raw.decode("utf-8", "replace")
                sink.append(text)
                text = text.rstrip("\n")
                with self._print_lock:
                    lines.append((rank, name, text))
                    if self.echo:
                        target = (self._out or sys.stdout) if name == "stdout" else (
                            self._err or sys.stderr)
                        target.write(f"[{rank}]<{name}>:{text}\n")
                        target.flush()


# ----------------------------------------------------------------------------------------------
# Command line


def _floats(text: str) -> list:
    return [_rate(v) if v.lower() in ("none", "off") else float(v) for v in text.split(",")]


def _schedule(text: str) -> list:
    out = []
    for item in filter(None, text.split(",")):
        try:
            t, host, rate = item.split(":")
            out.append((float(t), int(host), _rate(rate)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad schedule entry {item!r}: expected SECONDS:HOST:MBIT (MBIT may be 'none')"
            ) from None
    return out


def _one_or_list(values: Optional[list]):
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m adaptive_lsgd.tools.cluster",
        description="Run a command as a Horovod (Gloo) job on an emulated multi-host cluster: one "
                    "network namespace per host, shaped links, per-host compute slowdown. Needs root.",
        epilog="example: python -m adaptive_lsgd.tools.cluster --hosts 2 --workers-per-host 2 "
               "--rate-mbit 100 --slowdown 1,2 --schedule 10:0:10 -- python train.py")
    p.add_argument("--hosts", type=int, default=2, help="number of emulated hosts (default 2)")
    p.add_argument("--workers-per-host", type=lambda s: [int(v) for v in s.split(",")], default=[1],
                   help="workers per host: one number or one per host (default 1)")
    p.add_argument("--rate-mbit", type=_floats, default=None,
                   help="link rate per host in Mbit/s, one value or comma-separated per host "
                        "('none' = unshaped; default unshaped)")
    p.add_argument("--slowdown", type=_floats, default=None,
                   help="compute slowdown per host, e.g. 1,2 (exported as _ALSGD_EMU_SLOWDOWN)")
    p.add_argument("--schedule", type=_schedule, default=None,
                   help="rate changes during the run: SECONDS:HOST:MBIT,... (e.g. 10:0:10,30:0:none)")
    p.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    p.add_argument("--run-id", default=None, help="name of the run's resources ([a-z0-9]{1,6})")
    p.add_argument("--quiet", action="store_true", help="do not echo worker output")
    p.add_argument("--cleanup", action="store_true",
                   help="remove namespaces/veths/bridges (prefix alsgd) left by crashed runs and exit")
    p.add_argument("--force", action="store_true", help="with --cleanup: also remove live runs")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.cleanup and not args.command:
        p.error("a command is required: ... -- python train.py")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = "adaptive_lsgd.tools.cluster"
    # Like horovodrun: SIGINT and SIGTERM always end the job (and tear the cluster down), even
    # when the shell started us with SIGINT ignored (a background job).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        require_root()
        if args.cleanup:
            removed = cleanup_stale(run_id=args.run_id, force=args.force)
            print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")
            return 0
        cluster = EmulatedCluster(
            hosts=args.hosts, workers_per_host=_one_or_list(args.workers_per_host),
            rate_mbit=_one_or_list(args.rate_mbit), slowdown=_one_or_list(args.slowdown),
            schedule=args.schedule, run_id=args.run_id, echo=not args.quiet)
        with cluster:
            result = cluster.run(args.command, timeout=args.timeout)
    except (ClusterError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; cluster torn down", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{prog}: {e}; cluster torn down", file=sys.stderr)
        return 128 + e.signum
    if result.timed_out:
        return 124
    return next((rc if rc > 0 else 128 - rc for rc in result.returncodes if rc != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
