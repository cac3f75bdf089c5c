"""Built-in policies, one short file each; importing registers them."""

from quanta.sched.policies.prefill_first import PrefillFirstPolicy
from quanta.sched.policies.sarathi import SarathiPolicy

__all__ = ["PrefillFirstPolicy", "SarathiPolicy"]
