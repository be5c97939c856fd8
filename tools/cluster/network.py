"""The emulated cluster's resources in the root namespace: their names, ``ip``/``tc`` helpers,
the per-run state files and :func:`cleanup_stale` (``--cleanup``).

Every resource is named ``alsgd<run>...``: ``alsgd<run>h<i>`` (host *i*'s namespace),
``alsgd<run>v<i>`` / ``alsgd<run>p<i>`` (the two ends of its veth pair), ``alsgd<run>br`` (the
bridge), and ``/etc/netns/alsgd<run>h<i>/``; a launcher records itself in
``/run/alsgd-cluster/<run>.json``, so a clean-up leaves a live run alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Optional

PREFIX = "alsgd"
STATE_DIR = "/run/alsgd-cluster"
ETC_NETNS = "/etc/netns"  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
SUBNET_PREFIX = "10.213"
HOST_IFACE = "eth0"
# alsgd<run>h<i> (namespace), alsgd<run>v<i> / alsgd<run>p<i> (veth ends), alsgd<run>br (bridge)
_NAME_RE = re.compile(r"^" + PREFIX + r"([a-z0-9]+?)(?:[hvp]\d+|br)$")


class ClusterError(RuntimeError):
    """The emulated cluster could not be set up or used (the message is one line)."""


class NotRootError(ClusterError):
    """The emulated cluster needs root (network namespaces, veth pairs, tc)."""


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
