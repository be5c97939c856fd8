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

With ``ssh=True`` (``--ssh``) every host also runs its own sshd (:mod:`.ssh`) and a launcher
in the root namespace (``horovodrun -H``, ``alsgd-run -H``) reaches the hosts over ssh, as on a
real cluster; the hosts' interface is then named like the bridge, so horovodrun's interface
discovery finds one name on every host and on the launching side::

    python -m adaptive_lsgd.tools.cluster --hosts 2 --workers-per-host 2 --ssh -- \\
        alsgd-run -np 4 -H {hosts} python train.py

Modules: :mod:`.network` (resource names, ``ip``/``tc`` helpers, run state, clean-up),
:mod:`.emulator` (:class:`EmulatedCluster` and the worker-side helpers), :mod:`.ssh`
(:class:`SshAccess`), :mod:`.cli` (the
command line; ``__main__`` runs it). Everything public is importable from this package.
"""

from adaptive_lsgd.tools.cluster.emulator import (
                       ENV_HOST,
                       ENV_SLOWDOWN,
                       ENV_SLOWDOWNS,
                       EmulatedCluster,
                       LaunchResult,
                       RunResult,
                       Terminated,
                       emulated_host,
                       emulated_slowdown,
)
from adaptive_lsgd.tools.cluster.network import (
                       ETC_NETNS,
                       HOST_IFACE,
                       PREFIX,
                       ClusterError,
                       NotRootError,
                       cleanup_stale,
                       require_root,
)
from adaptive_lsgd.tools.cluster.ssh import SshAccess, require_ssh

__all__ = ["EmulatedCluster", "RunResult", "LaunchResult", "SshAccess", "require_ssh",
           "ENV_SLOWDOWNS", "ClusterError", "NotRootError", "Terminated", "cleanup_stale",
           "require_root", "emulated_slowdown", "emulated_host", "ENV_SLOWDOWN", "ENV_HOST", "PREFIX",
           "ETC_NETNS", "HOST_IFACE"]
