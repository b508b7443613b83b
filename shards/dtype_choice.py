"""What `--dtype auto` means for a checkpoint on a device, and why.

auto takes the checkpoint's own dtype where the device computes it natively, and float32
otherwise:

- a Hugging Face folder: its config.json `torch_dtype` (or `dtype`); bfloat16 on CUDA GPUs with
  bf16 (`torch.cuda.is_bf16_supported()`) and on CPUs with native bf16 (AVX512-BF16, AMX-BF16 or
  Arm BF16); float16 on CUDA GPUs and on CPUs with AVX512-FP16 or AMX-FP16; float32 as it is.
- a GGUF file (builtin:smollm2 is one): its linears are quantized blocks, with no float dtype to
  keep, so they are dequantized to bfloat16 where the device computes it natively, else float32.
- builtin:tiny: float32 (its weights are made in float32, and the tests that use it compare in it).

Every rank of a replica decides alone, from the same inputs: ranks on one host agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shardgate.proto.models import TINY

_CPU_NATIVE_FLAGS = {
    "bfloat16": {"avx512_bf16", "amx_bf16", "bf16"},  # x86 AVX512-BF16 / AMX, Arm BF16
    "float16": {"avx512_fp16", "amx_fp16"},
}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a replica runs in and the reason, as the log and ModelInfo state them."""

    name: str
    """float32, bfloat16 or float16 (the torch dtype of the same name)."""
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.name)


def choose_dtype(requested: str, model: Path | str, device: torch.device) -> DtypeChoice:
    """The dtype to load model in on device: requested itself unless it is auto (see the module
    docstring). model is builtin:tiny, a .gguf file or a Hugging Face folder (already resolved
    from builtin:smollm2)."""
    if requested != "auto":
        return DtypeChoice(requested, "--dtype")
    if str(model) == TINY:
        return DtypeChoice("float32", f"auto: {TINY} is made in float32")
    if str(model).endswith(".gguf"):
        if computes_natively("bfloat16", device):
            return DtypeChoice("bfloat16", f"auto: GGUF weights are quantized (no float dtype); {device.type} computes bfloat16 natively")
        return DtypeChoice("float32", f"auto: GGUF weights are quantized (no float dtype); {device.type} has no native bfloat16")
    stored = _checkpoint_dtype(Path(model))
    if stored is None:
        return DtypeChoice("float32", "auto: config.json states no torch_dtype")
    if stored == "float32":
        return DtypeChoice("float32", "auto: the checkpoint is float32")
    if computes_natively(stored, device):
        return DtypeChoice(stored, f"auto: the checkpoint is {stored}, which {device.type} computes natively")
    return DtypeChoice("float32", f"auto: the checkpoint is {stored}, which {device.type} does not compute natively")


def computes_natively(dtype: str, device: torch.device) -> bool:
    """Whether device has hardware arithmetic for dtype (bfloat16 or float16)."""
    if device.type == "cuda":
        return dtype == "float16" or (dtype == "bfloat16" and torch.cuda.is_bf16_supported())
    return bool(_CPU_NATIVE_FLAGS.get(dtype, set()) & _cpu_flags())


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _checkpoint_dtype(folder: Path) -> str | None:
    """config.json's torch_dtype (dtype in newer transformers), when it is one a replica runs in."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the load that follows reports the folder's problem
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else None
