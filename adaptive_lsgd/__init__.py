"""adaptive-lsgd: the framework-free core.

Adaptive, hierarchical, post-local SGD for Horovod: measure compute and collective time,
model the cost, choose the local period H and the block periods per level online, with
every rank taking the same decisions. Integrations live in ``adaptive_lsgd.integrations``
(``torch``, ``tensorflow``); this package imports numpy and the standard library only.
"""

from .agreement import ConfigMismatchError, check_agreement
from .config import Config, ConfigError, load_config
from .cost_model import CostModel, LinkModel
from .decision_log import DecisionLog, read_log
from .policies import POLICIES, AdaptivePolicy, FixedPolicy, Policy
from .scheduler import LOCAL, MINI_BATCH, DesyncError, NonFiniteModelError, Scheduler, SyncPlan, SyncResult
from .topology import Stage, Topology, TopologyError

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "load_config", "Topology", "TopologyError", "Stage", "CostModel",
    "LinkModel", "Policy", "FixedPolicy", "AdaptivePolicy", "POLICIES", "Scheduler", "SyncPlan",
    "SyncResult", "NonFiniteModelError", "DesyncError", "DecisionLog", "read_log",
    "ConfigMismatchError", "check_agreement", "MINI_BATCH", "LOCAL", "__version__",
]
