"""C++ kernels for the CPU path, compiled on first use with torch's extension builder (cached).

If the build is impossible here (no compiler, no ninja) or turned off with QUANTA_CPU_KERNELS=0, the
portable torch code runs instead; the kernels only make the same computation faster.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from functools import cache
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("quanta")

SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("cpu_kernels.cpp", "amx_linear.cpp", "avx512_linear.cpp")
]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


@cache
def cpuinfo_flags() -> str | None:
    """The CPU's feature line in Linux's /proc/cpuinfo (x86 "flags", Arm "Features"; "" when it has
    none), None where it cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")


def _cpu_signature() -> str:
    """-march=native code must not be reused on another CPU: the build name carries the CPU's flags."""
    flags = cpuinfo_flags()
    return platform.processor() if flags is None else flags


@cache
def cpu_kernels() -> ModuleType | None:
    if os.environ.get("QUANTA_CPU_KERNELS", "1") == "0":
        return None
    code = b"".join(source.read_bytes() for source in SOURCES)
    digest = hashlib.sha256(code + " ".join(CFLAGS).encode() + _cpu_signature().encode())
    name = f"quanta_cpu_kernels_{digest.hexdigest()[:12]}"
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja surfaces as several exception types
        logger.warning(
            "quanta: C++ CPU kernels unavailable (%s); using the portable torch path", str(e)[:200]
        )
        return None
