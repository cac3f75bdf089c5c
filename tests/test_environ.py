"""Importing quanta defaults OMP_WAIT_POLICY to PASSIVE (kept when the user set it), and peer_environ()
hands other programs the environment without that default."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = """
import os, quanta
print(os.environ.get("OMP_WAIT_POLICY"), quanta.peer_environ().get("OMP_WAIT_POLICY"))
"""


def run(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_omp_wait_policy_default_stays_out_of_peers_and_yields_to_the_user() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert run(env) == ["PASSIVE", "None"]
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "ACTIVE"]
