"""Built-in routers, one short file each; importing registers them."""

from quanta.cluster.routers.freeness import FreenessRouter
from quanta.cluster.routers.least_load import LeastLoadRouter
from quanta.cluster.routers.power_of_two import PowerOfTwoRouter
from quanta.cluster.routers.prefix import PrefixRouter
from quanta.cluster.routers.round_robin import RoundRobinRouter
from quanta.cluster.routers.session import SessionRouter

__all__ = [
    "FreenessRouter",
    "LeastLoadRouter",
    "PowerOfTwoRouter",
    "PrefixRouter",
    "RoundRobinRouter",
    "SessionRouter",
]
