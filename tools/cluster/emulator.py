"""The emulated cluster itself: :class:`EmulatedCluster` (hosts as network namespaces, shaped
links, workers started with the variables ``horovodrun --gloo`` gives them) and what a worker
reads back (:func:`emulated_slowdown`, :func:`emulated_host`). The package docstring
(:mod:`adaptive_lsgd.tools.cluster`) describes the network.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import secrets
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

from adaptive_lsgd.tools.cluster.network import (
    ETC_NETNS,
    HOST_IFACE,
    PREFIX,
    SUBNET_PREFIX,
    ClusterError,
    _cmd,
    _etc_names,
    _kill_netns_pids,
    _link_names,
    _netns_names,
    _ours,
    _proc_start_time,
    _remove_run,
    _state_lock,
    _state_path,
    require_root,
)
from adaptive_lsgd.tools.cluster.ssh import SshAccess

ENV_SLOWDOWN = "_ALSGD_EMU_SLOWDOWN"
ENV_HOST = "_ALSGD_EMU_HOST"
ENV_SLOWDOWNS = "_ALSGD_EMU_SLOWDOWNS"  # every host's, for workers a launcher started over ssh
_HOSTNAME_RE = re.compile(r"^" + PREFIX + r"[a-z0-9]+?h(\d+)$")
MAX_HOSTS = 200
_RUN_ID_RE = re.compile(r"^[a-z0-9]{1,6}$")
_TBF_LATENCY = "100ms"

Rate = Optional[float]


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM/SIGHUP arrives while a cluster is up."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def emulated_slowdown(default: float = 1.0) -> float:
    """The compute slowdown factor of this worker's emulated host (1.0 outside a cluster)."""
    value = os.environ.get(ENV_SLOWDOWN)
    if value:
        return float(value)
    host, every = emulated_host(), os.environ.get(ENV_SLOWDOWNS)
    if host is not None and every:
        return float(every.split(",")[host])
    return default


def emulated_host() -> Optional[int]:
    """The index of this worker's emulated host, or ``None`` outside an emulated cluster (a
    worker started over ssh knows it by its host name, ``alsgd<run>h<i>``)."""
    value = os.environ.get(ENV_HOST)
    if value:
        return int(value)
    m = _HOSTNAME_RE.match(socket.gethostname())
    return int(m.group(1)) if m else None


@dataclass
class LaunchResult:
    """What :meth:`EmulatedCluster.launch` returns: the launcher's exit code and output."""

    returncode: int
    stdout: str
    stderr: str
    elapsed: float = 0.0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0


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
        ssh: give every host an sshd reachable at its address (:mod:`.ssh`), so that real
            launchers (``horovodrun -H``, ``alsgd-run -H``) started in the root namespace with
            :meth:`launcher_env` reach the hosts over ssh (:meth:`launch`). The hosts' interface
            is then named like the bridge, as the cluster interface of every machine of a real
            cluster has one name, so horovodrun's interface discovery finds it.
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

    Launched the way users launch (as root)::

        with EmulatedCluster(hosts=2, workers_per_host=2, rate_mbit=100, ssh=True) as cluster:
            result = cluster.launch(["alsgd-run", "-np", "4", "-H", cluster.hosts_arg(),
                                     "python", "train.py"], timeout=600)
        print(result.returncode, result.stdout)
    """

    def __init__(self, hosts: int = 2, workers_per_host: Union[int, Sequence[int]] = 1,
                 rate_mbit=None, slowdown=None, schedule: Optional[Sequence] = None,
                 run_id: Optional[str] = None, echo: bool = True,
                 out: Optional[IO] = None, err: Optional[IO] = None, ssh: bool = False):
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
        self.iface = self.bridge if ssh else HOST_IFACE  # the hosts' interface
        self.ssh = SshAccess(self) if ssh else None
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
        """The IPv4 address of ``host`` (its :attr:`iface`)."""
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
            if self.ssh is not None:
                self.ssh.start()
        except BaseException:
            self.close()
            raise
        rates = ["-" if r is None else f"{r:g}" for r in self._rates]
        self._log(f"{self.hosts} hosts x {self.workers_per_host} workers, {self.subnet}.0/24, "
                  f"rendezvous {self.bridge_address}:{self._port()}, rates Mbit/s {rates}, "
                  f"slowdown {self.slowdown}" + (f", sshd on {self.hosts_arg()}" if self.ssh else ""))
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
            _cmd(["ip", "-n", ns, "link", "set", peer, "name", self.iface])
            _cmd(["ip", "-n", ns, "addr", "add", f"{self.host_address(h)}/24", "dev", self.iface])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", ns, "link", "set", self.iface, "up"])
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
            for step in (self._kill_workers, self._close_ssh, self._stop_rendezvous,
                         self._delete_network):
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

    def _close_ssh(self) -> None:
        if self.ssh is not None:
            self.ssh.close()

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
        names = [self.veth(host), self.iface]
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
                        "HOROVOD_GLOO_IFACE": self.iface,
                        "NCCL_SOCKET_IFNAME": self.iface,
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

    # -- launching the way users do (ssh=True) -------------------------------------------------
    def hosts_arg(self) -> str:
        """horovodrun's ``-H`` for this cluster: ``ADDRESS:SLOTS,...`` (needs ``ssh=True``)."""
        return ",".join(f"{self.host_address(h)}:{w}" for h, w in enumerate(self.workers_per_host))

    def launcher_env(self, env: Optional[dict] = None) -> dict:
        """The environment for a launcher in the root namespace: this process's, ``env`` on top,
        the run's ``ssh`` first on PATH, a HOME of the run's own (horovodrun's cache) and
        every host's slowdown (``_ALSGD_EMU_SLOWDOWNS``,
        which a worker reads by its host name, as horovodrun gives every host one environment)."""
        if self.ssh is None:
            raise ClusterError("launching over ssh needs EmulatedCluster(..., ssh=True)")
        base = dict(os.environ)
        base.update({k: str(v) for k, v in (env or {}).items()})
        base[ENV_SLOWDOWNS] = ",".join(repr(float(s)) for s in self.slowdown)
        # horovodrun caches its ssh checks and the interfaces it found in ~/.horovod for an hour,
        # keyed by -np and -H: another run on the same addresses has another interface name.
        base["HOME"] = self.ssh.home_dir
        base["PYTHONUNBUFFERED"] = "1"
        return self.ssh.env(base)

    def launch(self, command: Sequence[str], env: Optional[dict] = None,
               timeout: Optional[float] = None, cwd: Optional[str] = None,
               schedule: Optional[Sequence] = None) -> LaunchResult:
        """Run a launcher (``horovodrun``, ``alsgd-run``, ...) in the root namespace, where it
        reaches the hosts over ssh, and wait; its output is echoed and captured. After
        ``timeout`` seconds it is killed (its workers with the cluster's sweep) and the result
        says ``timed_out``. ``schedule`` as in :meth:`run`."""
        if self.subnet is None or self._closed:
            raise ClusterError("the cluster is not running")
        full_env = self.launcher_env(env)
        sched = self._check_schedule(schedule) if schedule is not None else self.schedule
        out: list = []
        err: list = []
        lines: list = []
        stop = threading.Event()
        t0 = time.monotonic()
        proc = subprocess.Popen(list(command), env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        pumps = [threading.Thread(target=self._pump_launcher, args=(name, stream, sink, lines),
                                  daemon=True)
                 for stream, sink, name in ((proc.stdout, out, "stdout"), (proc.stderr, err, "stderr"))]
        for t in pumps:
            t.start()
        self._log(f"launched: {' '.join(command)}")
        if sched:
            threading.Thread(target=self._schedule_loop, args=(sched, t0, stop),
                             name=f"alsgd-schedule-{self.run_id}", daemon=True).start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._log(f"timeout after {timeout:g}s; killing the launcher and the workers")
        finally:
            stop.set()
            self._kill_workers([proc])
            if timed_out:
                for h in range(self.hosts):  # what the launcher left on the hosts, not the sshds
                    self._kill_host_sessions(h)
            for t in pumps:
                t.join(timeout=2.0)
        result = LaunchResult(returncode=proc.returncode, stdout="".join(out), stderr="".join(err),
                              elapsed=time.monotonic() - t0, timed_out=timed_out)
        self._log(f"launcher exited with {result.returncode} after {result.elapsed:.1f}s")
        return result

    def _kill_host_sessions(self, host: int) -> None:
        keep = set(self.ssh.server_pids) if self.ssh else set()
        out = _cmd(["ip", "netns", "pids", self.namespace(host)], check=False).stdout
        for tok in out.split():
            if tok.isdigit() and int(tok) not in keep:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(tok), signal.SIGKILL)

    def _pump_launcher(self, name: str, stream, sink: list, lines: list) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                text = raw.decode("utf-8", "replace")
                sink.append(text)
                with self._print_lock:
                    lines.append((name, text.rstrip("\n")))
                    if self.echo:
                        target = (self._out or sys.stdout) if name == "stdout" else (
                            self._err or sys.stderr)
                        target.write(text)
                        target.flush()

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
