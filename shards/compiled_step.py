"""The compiled decode step: the model's forward over a step of single-token chunks (decodes),
compiled by torch.compile (inductor) once per batch-size bucket and padded up to the next
bucket, the CPU counterpart of CUDA-graph capture sizes.

- Freezing (inductor's `freezing`): the weights become constants of the graph, prepacked once
  for oneDNN, and the norms, RoPE, SiLU·mul and residual adds fuse into a few C++ kernels
  around the matmuls. Prefill and mixed steps run eager (their token counts vary per step).
- Buckets: 1, 2, 4, ... up to --max-num-seqs. A step of n decodes runs in the smallest bucket
  ≥ n; the padding rows embed token 0 at position 0 and write their keys and values into the
  cache's spare `pad_block`, which no sequence holds.
- The LM head is in the graph (prepacked too): the last stage's graph returns the logits.
- In bfloat16 with the CPU kernels loaded, buckets 1 and 2 trace every linear and the LM head
  as `shardgate_kernels::decode_linear` (a GEMV at the read bandwidth) instead of oneDNN.
- Attention between the fused regions: the graph calls paged attention (the cache write and
  the attention) as one opaque operator: the C++ kernel's `shardgate_kernels::paged_decode_step`
  when it is loaded (shards/cpu_kernels.py), else `shardgate::paged_decode_attention` (block
  gathers and SDPA; shards/attention.py says why it is opaque). Its block tables' width (the longest context, in blocks) is
  the one dynamic dimension of each bucket's graph (`mark_dynamic`), so contexts that grow step
  by step do not recompile; the tables get at least two columns (one would be specialised).
- Tensor parallelism: the row-parallel layers' all-reduces are traced into the graph (dynamo
  turns them into functional collectives), so every rank runs one graph per step. Pipeline
  stages hand their padded hidden states on as they are.
- Warm-up compiles every bucket before the shard serves; a failed compile (no C++ compiler, a
  cache folder that cannot be made, an inductor error) logs one line and the replica runs eager.
  The compiled C++ kernels and the graphs' C++ wrappers are cached in --compile-cache-dir, so
  a restart only traces and lowers the graphs again (inductor's whole-graph cache skips graphs
  holding prepacked oneDNN weights, which cannot be pickled); see stable_wrapper_source.
- int8 weights stay int8 in the graph (int8_linear.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
import types
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.llama import LlamaForCausalLM

log = logging.getLogger("shardgate.shard")

MIN_TABLE_BLOCKS = 2
"""Block-table columns of a compiled step at least (one would be specialised by the compiler)."""


class LayerCaches(NamedTuple):
    """Each layer's keys and values, as views the graph takes of the cache's one storage tensor.

    The graph gets the storage whole, as one input, rather than the layers' views of it: graph
    inputs that alias one another and are written make the compiler rebuild their common base
    around the writes."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes with a compiled graph: powers of two below max_num_seqs, then max_num_seqs."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return (*buckets, max_num_seqs)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/shardgate/compile, else ~/.cache/shardgate/compile."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shardgate" / "compile"


def skip_instance_guards(entries) -> list[bool]:
    """Which of dynamo's guards a compiled step checks on every call: all but those on the
    CompiledDecode's own attributes (the model's submodules, their hooks, types and constants:
    about 80% of them). The model is not changed once compiled, and checking them cost about
    0.3 ms a step on the bench model and 0.9 ms on SmolLM2 (torch.profiler's "TorchDynamo Cache
    Lookup"). Each instance compiles its own copy of the forward's code (own_code), so no other
    instance's graphs can match its calls without those guards."""
    return [not entry.name.startswith("self.") for entry in entries]


def own_code(function: types.FunctionType) -> types.FunctionType:
    """function with a code object of its own: dynamo keeps compiled graphs, and counts
    recompiles, per code object."""
    return types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )


def stable_wrapper_source() -> None:
    """Makes a graph's C++ wrapper source the same at every start, so that its shared object
    comes from the cache folder on a restart instead of g++ (about 4 s a bucket on the test
    model, measured 27 → 15 s for three buckets in a fresh process).

    Inductor heads that source with one comment line per frozen constant ending in the tensor's
    id, "so our code cache gives different constants different files" (codegen/wrapper.py). The
    JIT C++ wrapper takes its constants as inputs, though (`auto c = std::move(inputs[i])`,
    appended by the Python module that holds them), so one compiled wrapper serves any
    constants of the same sizes and strides: the line keeps device, dtype, sizes and strides and
    drops the id (torch 2.13). Process-wide, like the inductor settings in warm_up."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    def write_constant(self, name: str, hashed: str) -> None:
        self.header.writeline(f"// {name} {hashed.rsplit(' ', 1)[0]}")

    CppWrapperCpu.write_constant = write_constant


class CompiledDecode:
    """One rank's compiled decode forward, per bucket; counts which bucket served each step."""

    def __init__(
        self, model: LlamaForCausalLM, kv_cache: KVCache, buckets: tuple[int, ...], cache_dir: Path, cpp_wrapper: bool = True
    ) -> None:
        self.model = model
        self.cpp_wrapper = cpp_wrapper and model.parallel.tp.size == 1
        """Whether the graph's wrapper (the code calling its kernels) is C++: measured 13.2 → 12.0 ms
        a batch-1 step on the bench model, 24.4 → 16.5 ms on SmolLM2's 30 layers. Not with tensor
        parallelism: inductor's C++ wrapper cannot call the traced collectives ("arg type Any is
        not yet supported by custom_op_wrapper", torch 2.13). torch.profiler does not see the
        operators a C++ wrapper calls (bench --profile compiles with the Python wrapper)."""
        if kv_cache.pad_block is None:
            raise ValueError("a compiled decode step needs a KV cache with a padding block (KVCache(padding_block=True))")
        self.kv_cache = kv_cache
        self.buckets = buckets
        """Batch sizes with a graph, ascending (decode_buckets)."""
        self.hits: Counter[int] = Counter()
        """Steps each bucket served since warm-up."""
        self.rows: Counter[int] = Counter()
        """Sequences those steps held (the rest of bucket × hits was padding)."""
        self.stats_file: Path | None = None
        """Where hits and rows are written after every step (shardgate bench reads them), if anywhere."""
        self.cache_dir = cache_dir
        self._compiled = None
        """The torch.compile'd forward, made by warm_up."""
        self._device = kv_cache.keys[0].device if kv_cache.keys else torch.device("cpu")

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        received: torch.Tensor | None,
        storage: torch.Tensor,
    ) -> torch.Tensor:
        block_size, window = self.kv_cache.block_size, self.model.config.sliding_window
        metadata = AttentionMetadata.for_decodes(slot_mapping, positions, block_tables, block_size, window)
        hidden = self.model(input_ids, positions, metadata, LayerCaches(storage[0].unbind(0), storage[1].unbind(0)), received)
        return hidden if self.model.lm_head is None else self.model.compute_logits(hidden)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds num_seqs decodes (None: more than the largest)."""
        return next((bucket for bucket in self.buckets if bucket >= num_seqs), None)

    def forward(
        self, token_ids: list[int], positions: list[int], block_tables: list[list[int]], received: torch.Tensor | None
    ) -> torch.Tensor:
        """n decodes (one token each, at positions, with their block tables) in their bucket's
        graph: logits (n, vocab) in the model dtype on the last pipeline stage (the LM head is in the graph,
        prepacked like the other linears), hidden states (n, hidden) to send on elsewhere;
        `received`: a later pipeline stage's input (n, hidden)."""
        num_seqs = len(token_ids)
        bucket = self.bucket_for(num_seqs)
        if bucket is None:
            raise ValueError(f"{num_seqs} decodes exceed the largest compiled bucket {self.buckets[-1]}")
        self.hits[bucket] += 1
        self.rows[bucket] += num_seqs
        hidden = self._run(bucket, token_ids, positions, block_tables, received)[:num_seqs]
        if self.stats_file is not None:
            self._write_stats()
        return hidden

    def _write_stats(self) -> None:
        """{"hits": {bucket: steps}, "rows": {bucket: sequences}}, replaced whole (a reader never sees half)."""
        partial = self.stats_file.with_suffix(".tmp")
        partial.write_text(json.dumps({"hits": self.hits, "rows": self.rows}))
        os.replace(partial, self.stats_file)

    def _run(
        self, bucket: int, token_ids: list[int], positions: list[int], block_tables: list[list[int]], received: torch.Tensor | None
    ) -> torch.Tensor:
        size, pad_block = self.kv_cache.block_size, self.kv_cache.pad_block
        padding = bucket - len(token_ids)
        width = max(MIN_TABLE_BLOCKS, *(pos // size + 1 for pos in positions)) if positions else MIN_TABLE_BLOCKS
        tables = [table[: pos // size + 1] for table, pos in zip(block_tables, positions)]
        tables = [table + [pad_block] * (width - len(table)) for table in tables] + [[pad_block] * width] * padding
        slots = [table[pos // size] * size + pos % size for table, pos in zip(block_tables, positions)] + [pad_block * size] * padding
        device = self._device
        block_table = torch.tensor(tables, device=device)  # (bucket, width)
        torch._dynamo.maybe_mark_dynamic(block_table, 1)
        if received is not None and padding:
            received = torch.cat((received, received.new_zeros(padding, received.shape[1])))
        return self._compiled(
            torch.tensor(token_ids + [0] * padding, device=device),
            torch.tensor(positions + [0] * padding, device=device),
            torch.tensor(slots, device=device),
            block_table,
            received,
            self.kv_cache.storage,
        )

    def warm_up(self, hidden_size: int, dtype: torch.dtype, first_stage: bool) -> bool:
        """Compiles every bucket (a step of padding rows only); logs one line per bucket and
        the total. Returns False, having logged why in one line, when compiling failed."""
        started = time.perf_counter()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir)  # read by inductor when it first compiles
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.buckets) + 1)
            # Process-wide, not torch.compile(options=...): passed as an option, freezing did not
            # happen (no frozen constants, no prepacked linears in the generated code).
            torch._inductor.config.freezing = True
            torch._inductor.config.cpp_wrapper = self.cpp_wrapper
            stable_wrapper_source()
            forward = types.MethodType(own_code(CompiledDecode._forward), self)
            self._compiled = torch.compile(forward, fullgraph=True, dynamic=False, options={"guard_filter_fn": skip_instance_guards})
            with torch.inference_mode():
                for bucket in self.buckets:
                    bucket_started = time.perf_counter()
                    received = None if first_stage else torch.zeros(0, hidden_size, dtype=dtype, device=self._device)
                    self._run(bucket, [], [], [], received)
                    log.info("compiled decode bucket %d in %.1f s", bucket, time.perf_counter() - bucket_started)
        except Exception as error:  # no C++ compiler, an unwritable cache folder, an inductor or dynamo error: serve eager
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            log.warning("compile failed (%s: %s); decode steps run eager", type(error).__name__, reason[:300])
            return False
        log.info(
            "compiled %d decode buckets (%s) in %.1f s; cache %s",
            len(self.buckets),
            ",".join(map(str, self.buckets)),
            time.perf_counter() - started,
            self.cache_dir,
        )
        return True
