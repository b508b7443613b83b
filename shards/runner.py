"""One model step on one rank: pack the scheduled chunks, run this rank's part of the model,
sample where asked.

Pipeline stages hand hidden states on with send/recv: every rank has the same plan, so a
receiver knows the (tokens, hidden) shape without being told."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.compiled_step import CompiledDecode
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.llama import LlamaForCausalLM
from shardgate.shards.model_config import ModelConfig
from shardgate.shards.sampler import SamplingParams, sample
from shardgate.shards.timing import CommTimer


@dataclass
class SeqChunk:
    """The tokens of one sequence whose keys and values this step computes."""

    seq_id: int
    token_ids: list[int]  # at positions start_pos, start_pos + 1, ...
    start_pos: int  # tokens of this sequence already in the cache
    block_table: list[int]  # physical blocks covering positions [0, start_pos + len(token_ids))
    sample: bool  # sample a next token after the last position (False for a non-final prefill chunk)
    sampling: SamplingParams
    output_index: int  # tokens generated so far: which draw of the sequence this is


@dataclass(frozen=True)
class DecodeBatch:
    """A step of single-token chunks, as the compiled decode graph takes it."""

    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]


@dataclass(frozen=True)
class SampleResult:
    seq_id: int
    token_id: int
    logprob: float | None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.config = config
        self.kv_cache = kv_cache
        self.device = torch.device(device)
        self.parallel = model.parallel
        self.dtype = next(model.parameters()).dtype
        self.compiled: CompiledDecode | None = None
        """Set once its warm-up compiled every bucket: steps of decodes alone then run through it."""

    def step(self, chunks: list[SeqChunk], timer: CommTimer | None = None) -> list[SampleResult]:
        """Run all chunks as one flat batch; one result per chunk with sample=True, in chunk
        order (on the last pipeline stage; earlier stages return none). With a timer, the
        step's collectives and pipeline transfers add their time to it."""
        if not chunks:
            return []
        compiled = self.compiled is not None and all(len(chunk.token_ids) == 1 for chunk in chunks)
        # A compiled graph's collectives are not timed: the timer would be a guard of the graph.
        self.parallel.tp.timer = None if compiled else timer
        try:
            return self._step(chunks, timer, compiled)
        finally:
            self.parallel.tp.timer = None

    def _step(self, chunks: list[SeqChunk], timer: CommTimer | None, compiled: bool) -> list[SampleResult]:
        for chunk in chunks:
            self._check(chunk)
        if compiled:
            input_ids = [chunk.token_ids[0] for chunk in chunks]
            metadata = DecodeBatch(input_ids, [chunk.start_pos for chunk in chunks], [chunk.block_table for chunk in chunks])
        else:
            input_ids = torch.tensor([t for chunk in chunks for t in chunk.token_ids], device=self.device)  # (T,)
            positions = torch.tensor(
                [p for chunk in chunks for p in range(chunk.start_pos, chunk.start_pos + len(chunk.token_ids))],
                device=self.device,
            )  # (T,)
            metadata = AttentionMetadata.build(
                [len(chunk.token_ids) for chunk in chunks],
                [chunk.start_pos for chunk in chunks],
                [chunk.block_table for chunk in chunks],
                self.kv_cache.block_size,
                self.device,
                self.config.sliding_window,
            )
        sampled = [chunk for chunk in chunks if chunk.sample]
        last_rows, end = [], 0
        for chunk in chunks:
            end += len(chunk.token_ids)
            if chunk.sample:
                last_rows.append(end - 1)

        with torch.inference_mode():
            if compiled:
                logits = self.forward_decodes(metadata, timer)  # (T, vocab): every row's (a decode's chunk is its last row)
                if logits is None or not sampled:
                    return []
                if len(sampled) < len(chunks):  # a one-token prefill chunk that is not its prompt's last
                    logits = logits[torch.tensor(last_rows, device=self.device)]
            else:
                hidden = self.forward(input_ids, positions, metadata, timer)  # (T, hidden)
                if hidden is None or not sampled:
                    return []
                logits = self.model.compute_logits(hidden[torch.tensor(last_rows, device=self.device)])  # (N, vocab)
            token_ids, logprobs = sample(logits, [chunk.sampling for chunk in sampled], [chunk.output_index for chunk in sampled])
        return [SampleResult(chunk.seq_id, token_id, logprob) for chunk, token_id, logprob in zip(sampled, token_ids, logprobs)]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata, timer: CommTimer | None = None
    ) -> torch.Tensor | None:
        """This rank's layers over the packed tokens: the final hidden states (T, hidden) on the
        last pipeline stage; earlier stages send theirs on and return None."""
        received = self._receive(len(input_ids), timer)
        return self._send(self.model(input_ids, positions, metadata, self.kv_cache, received), timer)

    def forward_decodes(self, batch: DecodeBatch, timer: CommTimer | None = None) -> torch.Tensor | None:
        """A step of decodes through the compiled graph of its batch-size bucket: every row's
        logits (T, vocab) on the last pipeline stage; earlier stages send their hidden states
        on and return None."""
        received = self._receive(len(batch.token_ids), timer)
        return self._send(self.compiled.forward(batch.token_ids, batch.positions, batch.block_tables, received), timer)

    def _receive(self, num_tokens: int, timer: CommTimer | None) -> torch.Tensor | None:
        """The previous pipeline stage's hidden states (num_tokens, hidden); None on the first stage."""
        if self.parallel.is_first_stage:
            return None
        received = torch.empty(num_tokens, self.config.hidden_size, dtype=self.dtype, device=self.device)
        with _timed(timer, "pp_recv"):
            dist.recv(received, src=self.parallel.prev_rank)
        return received

    def _send(self, hidden: torch.Tensor, timer: CommTimer | None) -> torch.Tensor | None:
        """Hands hidden on to the next pipeline stage (returns None), or returns it on the last."""
        parallel = self.parallel
        if not parallel.is_last_stage:
            with _timed(timer, "pp_send"):
                dist.send(hidden, dst=parallel.next_rank)
            return None
        return hidden

    def _check(self, chunk: SeqChunk) -> None:
        """Reject chunks that would index out of range (a bad id on a GPU kills the process, not the request)."""
        if not chunk.token_ids:
            raise ValueError(f"sequence {chunk.seq_id}: empty chunk")
        end = chunk.start_pos + len(chunk.token_ids)
        if chunk.start_pos < 0 or end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence {chunk.seq_id}: positions [{chunk.start_pos}, {end}) exceed "
                f"max_position_embeddings {self.config.max_position_embeddings}"
            )
        if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= self.config.vocab_size:
            raise ValueError(f"sequence {chunk.seq_id}: token id outside the vocabulary of {self.config.vocab_size}")
        blocks_needed = -(-end // self.kv_cache.block_size)
        table = chunk.block_table[:blocks_needed]
        if len(table) < blocks_needed or not all(0 <= b < self.kv_cache.num_blocks for b in table):
            raise ValueError(f"sequence {chunk.seq_id}: block table must hold {blocks_needed} block ids below {self.kv_cache.num_blocks}")


def _timed(timer: CommTimer | None, kind: str) -> contextlib.AbstractContextManager:
    return timer.measure(kind) if timer is not None else contextlib.nullcontext()
