"""The one probe of this machine's CPU: model, clock and the instruction-set features int8 speed depends on.

Read at run time, never assumed: the same code runs on CPUs with and without VNNI / BF16 / AMX, and every
latency result records what it ran on.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path

_FEATURES = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "avx512_bf16": ("avx512_bf16",),
    "amx": ("amx_int8", "amx_bf16", "amx_tile"),
}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    mhz: float | None
    flags: frozenset[str] = field(default_factory=frozenset)
    machine: str = ""

    def has(self, feature: str) -> bool:
        """Whether any of the /proc/cpuinfo flags behind `feature` (a key of `_FEATURES`) is present."""
        return any(flag in self.flags for flag in _FEATURES[feature])

    @property
    def vnni(self) -> bool:
        """int8 dot products without 16-bit saturation: AVX-VNNI / AVX512-VNNI, or ARM's dot products."""
        if not self.flags:
            return self.machine.lower() in ("arm64", "aarch64")
        return self.has("vnni")

    def features(self) -> dict[str, bool]:
        return {name: self.has(name) for name in _FEATURES}


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU, from /proc/cpuinfo where it exists (the platform module's names elsewhere)."""
    flags: set[str] = set()
    mhz, model = None, platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CpuInfo(model, mhz, frozenset(), platform.machine())
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
        elif key == "model name":
            model = value
    return CpuInfo(model, mhz, frozenset(flags), platform.machine())
