"""Hardware models for the simulator: one table of GPUs from public data sheets.

Every figure here is a published data-sheet number (dense tensor rates, not
the 2:4-sparsity ones). What a kernel actually attains of them is guesswork
that lives in ``compiler.cost.model`` (``Calibration``), not here.

Sources: NVIDIA A100 data sheet (SXM4 80GB) and Ampere whitepaper; H100 data
sheet (SXM5) and Hopper whitepaper; H200 data sheet (SXM); DGX/HGX B200 data
sheets (per-GPU figures = system figures / 8) and the Blackwell whitepaper.
Shared memory per SM is the largest configurable carve-out; a single block may
use up to 1 KiB less.

Extend the table with ``register_hardware``::

    from attnc.compiler.cost.hardware import Hardware, register_hardware
    register_hardware(Hardware("L40S", sms=142, tensor_tflops=362.05, hbm_gbps=864,
                               smem_per_sm_kib=100, l2_mib=96, vector_tflops=91.6))
    attnc.simulate(pat, ..., hardware="l40s")
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ...core.errors import SpecError, did_you_mean


def compute_capability(arch: str) -> int:
    """The compute capability an architecture names, as a number (``"sm90"``, ``"sm_80"`` -> 90, 80;
    0 for none)."""
    digits = "".join(ch for ch in arch if ch.isdigit())
    return int(digits) if digits else 0


@dataclass(frozen=True)
class Hardware:
    """A GPU as the cost model sees it.

    ``tensor_tflops``: dense fp16/bf16 tensor-core rate (TFLOP/s, fp32
    accumulate). ``vector_tflops``: non-tensor fp32 rate (TFLOP/s), which the
    elementwise mask evaluation of PARTIAL tiles runs on. ``hbm_gbps``: memory
    bandwidth (GB/s). ``smem_per_sm_kib``: shared memory per SM (KiB).
    ``l2_mib``: L2 cache (MiB). ``memory_gib``: HBM capacity (GiB).
    """

    name: str
    sms: int
    tensor_tflops: float
    hbm_gbps: float
    smem_per_sm_kib: int
    l2_mib: float
    vector_tflops: float
    memory_gib: float = 0.0
    arch: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("a hardware model needs a name", where="argument hardware")
        for field in ("sms", "smem_per_sm_kib"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"{field} must be a positive int, got {value!r}", where=f"hardware {self.name}")
        for field in ("tensor_tflops", "hbm_gbps", "l2_mib", "vector_tflops"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise SpecError(f"{field} must be a positive number, got {value!r}", where=f"hardware {self.name}")

    # per-SM figures in SI units (the cost model's currency)
    @property
    def flops_per_sm(self) -> float:
        return self.tensor_tflops * 1e12 / self.sms

    @property
    def vector_flops_per_sm(self) -> float:
        return self.vector_tflops * 1e12 / self.sms

    @property
    def bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9

    @property
    def smem_bytes(self) -> int:
        return self.smem_per_sm_kib * 1024

    def to_dict(self) -> dict:
        return asdict(self)


#: The table: lower-case key -> model. ``register_hardware`` adds to it.
HARDWARE: dict[str, Hardware] = {}


def register_hardware(hw: Hardware, *, aliases: tuple[str, ...] = (), replace: bool = False) -> Hardware:
    """Add a hardware model to the table under its name (case-insensitive) and
    any aliases. Re-registering a name raises unless ``replace=True``."""
    if not isinstance(hw, Hardware):
        raise SpecError(f"expected a Hardware, got {type(hw).__name__}", where="argument hw")
    for key in (hw.name, *aliases):
        low = key.strip().lower()
        if low in HARDWARE and not replace and HARDWARE[low] != hw:
            raise SpecError(f"hardware '{key}' is already registered", where="argument hw",
                            hint="pass replace=True to replace it")
        HARDWARE[low] = hw
    return hw


def hardware_for_gpu(gpu: str) -> Hardware:
    """The model of a GPU by its device name (``NVIDIA H200`` -> H200, ``NVIDIA A100-SXM4-80GB`` ->
    A100); H100 when unknown."""
    low = gpu.lower()
    for name in sorted(HARDWARE, key=len, reverse=True):
        if name in low.replace(" ", "-") or name in low.split():
            return HARDWARE[name]
    return get_hardware("h100")


def get_hardware(name) -> Hardware:
    """A model by name (case-insensitive, e.g. "h100", "H100-SXM"), or a ``Hardware`` as is."""
    if isinstance(name, Hardware):
        return name
    if not isinstance(name, str):
        raise SpecError(f"expected a hardware name, got {type(name).__name__}", where="argument hardware")
    key = name.strip().lower()
    if key in HARDWARE:
        return HARDWARE[key]
    names = sorted({hw.name.lower() for hw in HARDWARE.values()})
    hint = did_you_mean(key, list(HARDWARE)) or ("known: " + ", ".join(names))
    raise SpecError(f"unknown hardware '{name}'", where="argument hardware", hint=hint)


def hardware_names() -> list[str]:
    """The distinct models of the table, by name."""
    return sorted({hw.name for hw in HARDWARE.values()}, key=str.lower)


# A100 SXM4 80GB: 108 SMs, 312 TFLOP/s dense bf16, 2039 GB/s HBM2e, 164 KiB
# shared memory per SM, 40 MiB L2, 19.5 TFLOP/s fp32.
register_hardware(Hardware("A100", sms=108, tensor_tflops=312.0, hbm_gbps=2039.0, smem_per_sm_kib=164,
                           l2_mib=40.0, vector_tflops=19.5, memory_gib=80.0, arch="sm80"),
                  aliases=("a100-sxm", "a100-sxm4-80gb", "a100-80gb"))
# H100 SXM5 80GB: 132 SMs, 989.4 TFLOP/s dense bf16, 3350 GB/s HBM3, 228 KiB
# shared memory per SM, 50 MiB L2, 66.9 TFLOP/s fp32.
register_hardware(Hardware("H100", sms=132, tensor_tflops=989.4, hbm_gbps=3350.0, smem_per_sm_kib=228,
                           l2_mib=50.0, vector_tflops=66.9, memory_gib=80.0, arch="sm90"),
                  aliases=("h100-sxm", "h100-sxm5", "h100-sxm5-80gb"))
# H200 SXM 141GB: the H100 chip with HBM3e: 4800 GB/s.
register_hardware(Hardware("H200", sms=132, tensor_tflops=989.4, hbm_gbps=4800.0, smem_per_sm_kib=228,
                           l2_mib=50.0, vector_tflops=66.9, memory_gib=141.0, arch="sm90"),
                  aliases=("h200-sxm",))
# B200 (HGX B200, per GPU): 148 SMs, 2250 TFLOP/s dense fp16/bf16, 8000 GB/s
# HBM3e, 228 KiB shared memory per SM, 126 MiB L2, 75 TFLOP/s fp32, 180 GB.
register_hardware(Hardware("B200", sms=148, tensor_tflops=2250.0, hbm_gbps=8000.0, smem_per_sm_kib=228,
                           l2_mib=126.0, vector_tflops=75.0, memory_gib=180.0, arch="sm100"),
                  aliases=("b200-sxm", "hgx-b200"))

__all__ = ["HARDWARE", "Hardware", "get_hardware", "hardware_names", "register_hardware"]
