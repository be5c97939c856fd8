"""ssh into the emulated hosts, the way ``horovodrun -H host1:2,host2:2`` reaches real ones.

:class:`SshAccess` gives each host of a started :class:`~.emulator.EmulatedCluster` its own
``sshd`` (Debian's ``openssh-server``), started inside the host's namespace (so in its UTS
namespace and with its ``/etc/hosts``, like the workers :meth:`~.emulator.EmulatedCluster.popen`
starts) and listening on port 22 of the host's address. Everything it needs is made per run in
one private directory and removed with it: a host key, a client key pair whose public half is
the only authorised key, a ``known_hosts`` that lists the hosts, an ``ssh_config``, and a ``bin/``
with an ``ssh`` that runs the system's client with that config (``-F``). A launcher started with
:meth:`env` (that ``bin/`` first on ``PATH``) therefore reaches every emulated host with plain
``ssh ADDRESS``, as horovodrun does, and nothing touches ``~/.ssh`` or ``/etc/ssh``.

The client config only names the run's own addresses, and sshd only listens inside the run's
namespaces, so nothing here talks to anything but loopback and the namespaces the run made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from typing import Optional

from adaptive_lsgd.tools.cluster.network import ClusterError

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"  # sshd refuses to start without its privilege-separation directory


def require_ssh() -> None:
    """Raise :class:`ClusterError` unless an ssh server and client are installed."""
    missing = [p for p in (SSHD,) if not os.access(p, os.X_OK)]
    missing += [p for p in ("ssh", "ssh-keygen") if shutil.which(p) is None]
    if missing:
        raise ClusterError(f"ssh to emulated hosts needs openssh-server and openssh-client "
                           f"(missing {', '.join(missing)}; `make setup` as root installs them)")


def _run(args: list, check: bool = True) -> None:
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")


def _keygen(path: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alsgd-emulated-cluster",
                    "-f", path], check=True, stdin=subprocess.DEVNULL, capture_output=True)


class SshAccess:
    """An sshd per emulated host and the client config to reach them (see the module docstring).

    Example (as root)::

        with EmulatedCluster(hosts=2, workers_per_host=2, ssh=True) as cluster:
            subprocess.run(["horovodrun", "-np", "4", "-H", cluster.hosts_arg(),
                            "python", "train.py"], env=cluster.launcher_env(), check=True)
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.dir: Optional[str] = None
        self._procs: list = []

    @property
    def bin_dir(self) -> str:
        return os.path.join(self._need_dir(), "bin")

    @property
    def config_path(self) -> str:
        return os.path.join(self._need_dir(), "ssh_config")

    @property
    def home_dir(self) -> str:
        """A HOME for the launchers of this run (removed with it)."""
        return os.path.join(self._need_dir(), "home")

    @property
    def identity_file(self) -> str:
        return os.path.join(self._need_dir(), "id_ed25519")

    @property
    def server_pids(self) -> list:
        """The pids of the hosts' sshds (a sweep of a host's sessions spares them)."""
        return [p.pid for p in self._procs]

    def _need_dir(self) -> str:
        if self.dir is None:
            raise ClusterError("ssh access is not started")
        return self.dir

    def start(self, timeout: float = 15.0) -> None:
        """Make the keys and configs, start every host's sshd and wait until each answers."""
        require_ssh()
        self.dir = tempfile.mkdtemp(prefix=f"alsgd-ssh-{self.cluster.run_id}-")
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        host_key = os.path.join(self.dir, "ssh_host_ed25519_key")
        _keygen(host_key)
        _keygen(self.identity_file)
        shutil.copy(self.identity_file + ".pub", os.path.join(self.dir, "authorized_keys"))
        addresses = [self.cluster.host_address(h) for h in range(self.cluster.hosts)]
        with open(host_key + ".pub") as fh:
            host_pub = " ".join(fh.read().split()[:2])
        with open(os.path.join(self.dir, "known_hosts"), "w") as fh:
            fh.writelines(f"{a} {host_pub}\n" for a in addresses)
        sshd_config = os.path.join(self.dir, "sshd_config")
        with open(sshd_config, "w") as fh:
            fh.write("\n".join([
                "Port 22", f"HostKey {host_key}", f"AuthorizedKeysFile {self.dir}/authorized_keys",
                "PidFile none", "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                "StrictModes no", "X11Forwarding no", "PrintMotd no", "LogLevel ERROR",
                # horovodrun opens one session per worker and per interface probe at once
                "MaxStartups 200:30:400", "MaxSessions 200", ""]))
        with open(self.config_path, "w") as fh:
            fh.write("\n".join([
                f"Host {' '.join(addresses)}", "  User root", f"  IdentityFile {self.identity_file}",
                "  IdentitiesOnly yes", f"  UserKnownHostsFile {self.dir}/known_hosts",
                "  GlobalKnownHostsFile /dev/null", "  BatchMode yes", "  ConnectTimeout 10",
                "  LogLevel ERROR", ""]))
        os.makedirs(self.bin_dir)
        os.makedirs(self.home_dir)
        real_ssh = shutil.which("ssh")
        wrapper = os.path.join(self.bin_dir, "ssh")
        with open(wrapper, "w") as fh:
            fh.write(f'#!/bin/sh\n# ssh with the emulated cluster {self.cluster.run_id}\'s keys\n'
                     f'exec {real_ssh} -F {self.config_path} "$@"\n')
        os.chmod(wrapper, 0o755)
        for h in range(self.cluster.hosts):
            with open(os.path.join(self.dir, f"sshd.h{h}.log"), "wb") as log:
                self._procs.append(self.cluster.popen(
                    h, [SSHD, "-D", "-e", "-f", sshd_config], stdout=log, stderr=log))
        deadline = time.monotonic() + timeout
        for h, address in enumerate(addresses):
            while True:
                proc = self._procs[h]
                if proc.poll() is not None:
                    with open(os.path.join(self.dir, f"sshd.h{h}.log"), errors="replace") as log:
                        err = log.read().strip().replace("\n", " ")
                    raise ClusterError(f"sshd of host {h} exited with {proc.returncode}: {err}")
                probe = self.ssh(address, ["true"], timeout=5)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"sshd of host {h} ({address}) does not answer: "
                                       f"{probe.stderr.strip()}")
                time.sleep(0.1)

    def ssh(self, address: str, command: list, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``command`` (one shell line on the host) over ssh and return what it printed."""
        return subprocess.run([os.path.join(self.bin_dir, "ssh"), address, " ".join(command)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    @contextlib.contextmanager
    def hide(self, host: int, directory: str):
        """Within the block, ``host`` sees an empty ``directory`` (a tmpfs over it in the mount
        namespace of its sshd, so of every later session): a host that lacks a file or a
        package. Nothing changes for the other hosts or the root namespace."""
        pid = str(self._procs[self.cluster._host(host)].pid)
        if not os.path.isdir(directory):
            raise ClusterError(f"hide: {directory} is not a directory")
        _run(["nsenter", "-t", pid, "-m", "mount", "-t", "tmpfs", "-o", "size=1m,mode=0755",
              "alsgd-hidden", directory])
        try:
            yield
        finally:
            _run(["nsenter", "-t", pid, "-m", "umount", directory], check=False)

    def env(self, base: Optional[dict] = None) -> dict:
        """``base`` (default: this process's environment) with the run's ``ssh`` first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([self.bin_dir, env.get("PATH", os.defpath)])
        return env

    def close(self) -> None:
        """Stop the sshds (the cluster's sweep kills their sessions) and delete the directory."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        self._procs = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
