"""What this CPU's matrix and vector units can do, read from the OS (no numpy, no torch).

The build reads it to pick the int8 weight range and to record which CPU its runtime choice
was timed on; the runtime to refuse a graph this CPU would compute wrongly; the benchmark for
the peak FLOP/s. Linux reads /proc/cpuinfo; elsewhere no feature is known, which makes every
choice the conservative one.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The flags that change a choice here, as Linux spells them.
FEATURES = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model", "vendor", "family", "features"}: the CPU's name and which FEATURES it has."""
    text = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id", ""),
        "family": fields.get("cpu family", ""),
        "features": [f for f in FEATURES if f in flags],
    }


def has(feature: str) -> bool:
    return feature in cpu_info()["features"]


def int8_dot_product() -> str | None:
    """The integer dot-product unit that sums u8 x s8 products in 32 bits (AMX-INT8 or a VNNI
    form), or None: then x86 int8 kernels sum pairs in saturating 16-bit lanes."""
    for f in ("amx_int8", "avx512_vnni", "avx_vnni"):
        if has(f):
            return f
    return None


def bf16_unit() -> str | None:
    """The bf16 arithmetic unit (AMX-BF16 or AVX512-BF16), or None."""
    for f in ("amx_bf16", "avx512_bf16"):
        if has(f):
            return f
    return None


def identity() -> dict:
    """What a timing taken here depends on: the CPU's name and its relevant features."""
    info = cpu_info()
    return {"model": info["model"], "features": info["features"]}
