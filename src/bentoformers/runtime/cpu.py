"""The CPU's instruction-set class, which decides how ONNX Runtime's int8 kernels compute, and its emulation.

Classes, newest first: `avx512-vnni` (AVX-512 with VNNI; AMX CPUs too), `avx-vnni`, `avx512`, `avx2`,
and `sse` for anything older. A class older than the native one is reproduced with Debian's qemu-user
(`qemu-x86_64 -cpu Haswell` gives AVX2's int8 results exactly, about 50x slower); newer ones cannot be.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
from functools import cache

# The flags that select ONNX Runtime's int8 and fp32 kernels, as /proc/cpuinfo names them.
KERNEL_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "amx_int8", "avx512_bf16")
# Older classes that qemu can present, with the CPU model that presents each.
EMULATED = {"avx2": "Haswell"}
ORDER = ("sse", "avx2", "avx512", "avx-vnni", "avx512-vnni")


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def isa_class(cpu_flags: frozenset[str] | None = None) -> str:
    have = flags() if cpu_flags is None else cpu_flags
    if {"avx512f", "avx512_vnni"} <= have:
        return "avx512-vnni"
    if "avx_vnni" in have:
        return "avx-vnni"
    if {"avx512f", "avx512bw"} <= have:
        return "avx512"
    if "avx2" in have:
        return "avx2"
    return "sse"


def describe() -> dict[str, object]:
    """This CPU as a model's metadata records it: class, model name, the kernel-relevant flags."""
    return {"class": isa_class(), "model": _model_name(), "flags": sorted(flags() & set(KERNEL_FLAGS))}


def _model_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may really use: its CPU affinity, capped by a cgroup CPU quota (a pod's
    `limits.cpu`). `os.cpu_count()` counts the node's cores: a 1-CPU pod on a 64-core node would open 64 threads
    that the quota then throttles."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cap_malloc_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas (as MALLOC_ARENA_MAX does), unless MALLOC_ARENA_MAX is set; True if capped.

    glibc gives threads up to 8 arenas per core. Each thread that first allocates under contention (tokenizing
    in a worker thread, a model call in BentoML's thread pool) can open one, and RSS then steps up by tens of
    MiB at random moments, long after the warm-up: memory that looks like a leak and is never given back.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, max(1, arenas)) == 1  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def _cgroup_quota(root: str) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None when unlimited."""
    for path, parse in ((f"{root}/cpu.max", _v2_quota), (f"{root}/cpu/cpu.cfs_quota_us", _v1_quota)):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except OSError:
            continue
        return parse(text, path)
    return None


def _v2_quota(text: str, path: str) -> float | None:
    fields = text.split()  # "<quota> <period>", or "max <period>" for no limit
    if not fields or fields[0] == "max":
        return None
    return int(fields[0]) / (int(fields[1]) if len(fields) > 1 else 100_000)


def _v1_quota(text: str, path: str) -> float | None:
    quota = int(text.strip())
    if quota <= 0:
        return None
    with open(path.replace("cfs_quota_us", "cfs_period_us"), encoding="ascii") as f:
        return quota / int(f.read().strip())


def emulated_classes() -> list[str]:
    """The classes older than this CPU's that an emulator can reproduce here."""
    native = ORDER.index(isa_class())
    return [c for c in EMULATED if ORDER.index(c) < native]


def emulator() -> str | None:
    return shutil.which("qemu-x86_64") if platform.machine() == "x86_64" else None


def run_emulated(isa: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """This Python, under qemu with the CPU model of class `isa`, running `args` (e.g. ["-m", "module", ...])."""
    exe = emulator()
    if exe is None:
        raise RuntimeError("qemu-x86_64 is not installed (Debian: apt-get install qemu-user)")
    return subprocess.run(
        [exe, "-cpu", EMULATED[isa], sys.executable, *args], capture_output=True, text=True, timeout=timeout
    )
