"""Built-in policies, one short file each; importing registers them."""

from quanta.sched.policies.batch import BatchPolicy
from quanta.sched.policies.continuum import ContinuumPolicy
from quanta.sched.policies.deadline import DeadlinePolicy
from quanta.sched.policies.plas import PLASPolicy
from quanta.sched.policies.prefill_first import PrefillFirstPolicy
from quanta.sched.policies.priority import PriorityPolicy
from quanta.sched.policies.sarathi import SarathiPolicy
from quanta.sched.policies.vtc import VTCPolicy
from quanta.sched.policies.wfq import WFQPolicy

__all__ = [
    "BatchPolicy",
    "ContinuumPolicy",
    "DeadlinePolicy",
    "PLASPolicy",
    "PrefillFirstPolicy",
    "PriorityPolicy",
    "SarathiPolicy",
    "VTCPolicy",
    "WFQPolicy",
]
