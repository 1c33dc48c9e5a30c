"""What this CPU does with int8, and which int8 form ONNX Runtime computes exactly on it.

ONNX Runtime (MLAS) multiplies uint8 activations by int8 weights on x86 with AVX2 / AVX-512
but without VNNI through ``vpmaddubsw``, which adds two ``u8 x s8`` products into a saturating
int16: ``255 * 127 * 2 = 64770 > 32767``. Such a CPU returns wrong sums wherever a pair of
products is large (ORT's documentation: "use reduce_range or U8U8" there). With weights in
``[-63, 63]`` (7 bits, ``reduce_range``) a pair is at most ``255 * 63 * 2 = 32130`` and never
saturates, so ORT's integer kernels equal the ONNX operator definitions (int32 accumulation)
and graphopt's torch simulation. CPUs with VNNI (``vpdpbusd`` accumulates straight into
int32) and ARM (``sdot``/``udot`` or widening multiplies) are exact with the full range.

Targets: ``vnni`` and ``arm`` use 8-bit weights ``[-127, 127]``; ``avx2`` (any x86 without
VNNI, and any x86 whose features cannot be read) uses 7-bit weights. ``auto`` picks one from
``/proc/cpuinfo`` (Linux) or the machine type.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

TARGETS = ("vnni", "avx2", "arm")

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class CpuInt8:
    """The int8-relevant features of one CPU."""

    machine: str
    model: str
    flags: frozenset[str]

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @property
    def is_arm(self) -> bool:
        return self.machine.lower().startswith(("arm", "aarch64"))

    @property
    def vnni(self) -> bool:
        return bool(self.flags & _VNNI_FLAGS)

    @property
    def target(self) -> str:
        """The int8 target ONNX Runtime is exact for on this CPU."""
        if self.is_arm:
            return "arm"
        if self.is_x86 and not self.vnni:
            return "avx2"
        return "vnni" if self.is_x86 else "arm"

    def describe(self) -> str:
        feats = [
            f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp") if f in self.flags
        ]
        return f"{self.model or self.machine} ({', '.join(feats) or 'no SIMD flags read'})"


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_int8() -> CpuInt8:
    """This machine's CPU (read once)."""
    model, flags = _read_cpuinfo()
    return CpuInt8(platform.machine() or "unknown", model, flags)


def resolve_target(target: str) -> str:
    """``auto`` -> this CPU's target; a named target is checked and returned."""
    if target == "auto":
        return cpu_int8().target
    if target not in TARGETS:
        raise ValueError(f"unknown int8 target {target!r}; use auto, {', '.join(TARGETS)}")
    return target


def weight_qmax(target: str) -> int:
    """The largest weight magnitude for ``target``: 127, or 63 where ``u8 x s8`` pairs
    saturate (x86 without VNNI)."""
    return 63 if resolve_target(target) == "avx2" else 127
