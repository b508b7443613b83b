"""Continuous (iteration-level) batching: what runs in each step.

The scheduler speaks plain data and imports no torch: `schedule()` returns a `StepPlan`, the
engine sends it to a replica, and `update()` applies the sampled tokens. Requests join and
leave between any two steps.

A plan counts as computed when it is made, so the next plan may be made before its answer is
applied (async scheduling, server/engine.py): a request whose token is still being sampled
decodes it next as `last_sampled_input` (the replica feeds the token it sampled), its blocks
already cover that position, and a request that will have its max_new_tokens once the steps in
flight answer gets no more steps.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from shardgate.server.block_manager import BlockManager, block_hash
from shardgate.server.config import SchedulerConfig
from shardgate.server.priority import virtual_arrival
from shardgate.server.request import FinishReason, Request, Status


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step."""

    request: Request
    start_pos: int
    """Tokens of the sequence already in the KV cache when the step runs."""
    num_tokens: int
    """Tokens whose KV the step computes: part of a prompt, or the last sampled token."""
    new_block_ids: list[int]
    """Blocks allocated for this step; for a sequence new to the replica, its whole table
    (blocks shared from the prefix cache first)."""
    sample: bool
    """The chunk reaches the end of the sequence, so the step samples its next token."""
    is_new: bool
    """The replica does not know the sequence yet: send its sampling settings."""
    output_index: int = 0
    """Tokens the request has generated before this chunk samples (applied and in flight):
    selects the seeded random stream of the draw."""
    last_sampled_input: bool = False
    """The chunk's input is the token a step still in flight samples: the replica feeds it."""


@dataclass
class StepPlan:
    step_id: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    free_seq_ids: list[int] = field(default_factory=list)
    """Sequences the replica should forget before the step (finished, aborted, preempted)."""
    preempted: list[Request] = field(default_factory=list)
    """Requests sent back to the queue by this plan to make room in the KV cache."""
    num_steps: int = 1
    """Decode steps the replica runs back to back (more than one only for a plan of decodes)."""
    after_step_id: int = 0
    """The step, sent before this one and maybe still running, that the replica must run this
    one right after (set by the engine; 0: none in flight)."""

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the plan computes (in all its steps)."""
        return sum(chunk.num_tokens for chunk in self.chunks) * self.num_steps


@dataclass(frozen=True)
class SchedulerStatus:
    """A snapshot of one replica's queue and KV cache."""

    total_blocks: int
    free_blocks: int
    kv_usage: float
    """Fraction of the blocks in use (0-1)."""
    running: int
    waiting: int
    waiting_tokens: int
    """Tokens the waiting requests will compute when they run."""
    preemptions: int
    started: int
    """Requests scheduled at least once."""
    prefix_query_tokens: int
    prefix_hit_tokens: int


class Scheduler:
    """Decodes first (oldest first), then new prefills, under a token budget and a sequence cap.

    Waiting requests are admitted in priority order with aging (server/priority.py). When a
    running request needs a KV block and none is free, the newest running request is
    preempted: its blocks are freed and it goes back to the queue (at its old place: its
    arrival and priority are unchanged), to be recomputed later (its tokens so far are kept,
    so greedy output is unchanged).

    Prefix caching (server/block_manager.py): a request admitted with nothing computed (new, or
    recomputed after a preemption) first takes the longest run of cached full blocks that
    matches its tokens, short of its last token (the step must compute at least one token to
    sample), and starts computing after them. A chunk registers each block it fills as it is
    planned: its tokens are known then, and the shard writes every new token's keys and values
    of a layer before any attention of that layer reads the cache (shards/attention.py), so a
    request admitted later in the same step already shares what an earlier chunk of that step
    computes. This relies on every planned chunk running: a request cancelled after its step
    was planned still has that chunk computed, only its token is dropped.
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: list[Request] = []
        """Sorted by queue key: the next request to admit first."""
        self.running: list[Request] = []
        self._pending_free: list[int] = []
        self._step_id = 0
        self.num_preemptions = 0
        self.num_started = 0
        """Requests scheduled at least once (sent to the replica)."""
        self.num_prefix_query_tokens = 0
        """Tokens of admitted requests looked up in the prefix cache (prompt, and any output
        when recomputed after a preemption)."""
        self.num_prefix_hit_tokens = 0
        """Of those, tokens whose KV came from the cache."""

    def has_work(self) -> bool:
        """Some request can be given a step (one held back for its slow reader cannot, nor one
        whose last token is in flight)."""
        return any(map(_can_step, self.running)) or self._next_waiting() is not None

    def _next_waiting(self) -> Request | None:
        """The first waiting request that is not held back."""
        return next((request for request in self.waiting if not request.held), None)

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def spare_blocks(self) -> int:
        """Free blocks less those the queued requests need to start (may be negative)."""
        return self.blocks.num_free - sum(self.blocks.blocks_for(r.num_tokens) - len(r.block_ids) for r in self.waiting)

    def status(self) -> SchedulerStatus:
        blocks = self.blocks
        return SchedulerStatus(
            total_blocks=blocks.num_blocks,
            free_blocks=blocks.num_free,
            kv_usage=blocks.usage,
            running=len(self.running),
            waiting=len(self.waiting),
            waiting_tokens=sum(request.num_tokens for request in self.waiting),
            preemptions=self.num_preemptions,
            started=self.num_started,
            prefix_query_tokens=self.num_prefix_query_tokens,
            prefix_hit_tokens=self.num_prefix_hit_tokens,
        )

    def add(self, request: Request) -> None:
        request.status = Status.WAITING
        bisect.insort(self.waiting, request, key=self._queue_key)

    def _queue_key(self, request: Request) -> tuple[float, int]:
        return virtual_arrival(request.priority, request.arrival, self.config.priority_aging_s), request.seq_id

    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(self._step_id)
        budget = self.config.max_batch_tokens

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if not _can_step(request):  # held back for its reader (it keeps its blocks), or its last token is in flight
                index += 1
                continue
            num_tokens = min(request.num_tokens + request.num_in_flight_tokens - request.num_computed_tokens, budget)
            new_blocks = self._grow_or_preempt(request, num_tokens, plan)
            if new_blocks is None:  # the request preempted itself: it was the newest
                break
            plan.chunks.append(self._chunk(request, num_tokens, new_blocks))
            budget -= num_tokens
            index += 1

        while budget > 0 and not plan.preempted and len(self.running) < self.config.max_num_seqs:
            request = self._next_waiting()
            if request is None:
                break
            cached = self._take_cached_prefix(request)
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self.blocks.grow(request.block_ids, request.num_computed_tokens + num_tokens)
            if new_blocks is None:
                self.blocks.free(request.block_ids)  # the cached prefix goes back too
                request.num_computed_tokens = 0
                break
            self.waiting.remove(request)
            request.status = Status.RUNNING
            if self.config.prefix_caching:
                self.num_prefix_query_tokens += request.num_tokens
                self.num_prefix_hit_tokens += cached
            if request.first_scheduled is None:
                request.first_scheduled = time.monotonic()
                request.num_cached_tokens = cached  # all prompt tokens: nothing is generated yet
                self.num_started += 1
            self.running.append(request)
            plan.chunks.append(self._chunk(request, num_tokens, new_blocks))
            budget -= num_tokens
        # Taken last, so that sequences preempted by this plan are forgotten before it runs.
        plan.free_seq_ids, self._pending_free = self._pending_free, []
        self._extend_decode_run(plan)
        for chunk in plan.chunks:  # computed from now on; the tokens it samples are in flight
            chunk.request.num_computed_tokens += chunk.num_tokens * plan.num_steps
            if chunk.sample:
                chunk.request.num_in_flight_tokens += plan.num_steps
        return plan

    def _extend_decode_run(self, plan: StepPlan) -> None:
        """Lets a plan of decodes run several steps in one round trip (config.decode_steps):
        only when no request waits (a new arrival waits at most one run), never past any
        request's max_new_tokens, and only if every sequence gets the blocks for those steps.
        A request that ends early (EOS, stop string) wastes at most the rest of the run."""
        if self.config.decode_steps == 1 or self._next_waiting() is not None or not plan.chunks:
            return
        if not all(chunk.num_tokens == 1 and chunk.sample for chunk in plan.chunks):
            return
        steps = min(self.config.decode_steps, *(_tokens_left(chunk.request) for chunk in plan.chunks))
        if steps <= 1:
            return
        for chunk in plan.chunks:
            request = chunk.request
            new_blocks = self.blocks.grow(request.block_ids, request.num_computed_tokens + steps)
            if new_blocks is None:
                return  # one step; blocks grown for earlier chunks stay theirs (the plan sends them)
            chunk.new_block_ids.extend(new_blocks)
        plan.num_steps = steps

    def update(self, plan: StepPlan, sampled: dict[int, tuple[int, float]]) -> list[Request]:
        """Applies one finished step of a plan (called once per step of a multi-step plan, in
        order, and plan by plan in the order they were made); returns the requests that got a
        new token, in plan order.

        `sampled` maps seq_id to (token id, logprob). Requests finished, aborted or preempted
        meanwhile (while the step ran, at an earlier step of the same plan, or at the plan
        before) are skipped: their token is dropped.
        """
        updated = []
        now = time.monotonic()
        for chunk in plan.chunks:
            request = chunk.request
            if request.status is not Status.RUNNING:
                continue
            if chunk.last_sampled_input and self.config.prefix_caching:  # its input token is known now
                self._register_filled_blocks(request, chunk.start_pos, chunk.start_pos + 1)
            if chunk.sample:
                token_id, logprob = sampled[request.seq_id]
                request.num_in_flight_tokens -= 1
                request.output_ids.append(token_id)
                if request.params.logprobs:
                    request.output_logprobs.append(logprob)
                if request.first_token is None:
                    request.first_token = now
                else:
                    request.token_gaps.append(now - request.last_token)
                request.last_token = now
                updated.append(request)
        return updated

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Ends a request wherever it is (queued or running) and frees its blocks at once."""
        if request.status is Status.FINISHED:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finished_at = time.monotonic()

    def _chunk(self, request: Request, num_tokens: int, new_blocks: list[int]) -> ScheduledChunk:
        start = request.num_computed_tokens
        is_new = not request.known_to_replica
        chunk = ScheduledChunk(
            request=request,
            start_pos=start,
            num_tokens=num_tokens,
            new_block_ids=list(request.block_ids) if is_new else new_blocks,
            sample=start + num_tokens == request.num_tokens + request.num_in_flight_tokens,
            is_new=is_new,
            output_index=len(request.output_ids) + request.num_in_flight_tokens,
            last_sampled_input=start >= request.num_tokens,  # a decode of the token in flight
        )
        # Set now, not when the step returns: if the request is aborted while the step runs,
        # the replica must still be told to forget it.
        request.known_to_replica = True
        if self.config.prefix_caching:  # the blocks it fills with known tokens (a token in flight: in update())
            self._register_filled_blocks(request, start, min(start + num_tokens, request.num_tokens))
        return chunk

    def _take_cached_prefix(self, request: Request) -> int:
        """Gives a request with nothing computed the cached blocks matching the start of its
        tokens (all but its last token at most); returns the tokens they hold."""
        if not self.config.prefix_caching:
            return 0
        limit = (request.num_tokens - 1) // self.blocks.block_size
        count = self.blocks.take_cached(request.block_ids, self._block_hashes(request, limit)[:limit])
        request.num_computed_tokens = count * self.blocks.block_size
        return request.num_computed_tokens

    def _register_filled_blocks(self, request: Request, start: int, end: int) -> None:
        """Registers the blocks that a chunk computing positions [start, end) fills."""
        size = self.blocks.block_size
        first, stop = start // size, end // size
        if first < stop:  # most decodes fill none
            hashes = self._block_hashes(request, stop)
            for index in range(first, stop):
                self.blocks.register(request.block_ids[index], hashes[index])

    def _block_hashes(self, request: Request, count: int) -> list[bytes]:
        """The request's block hashes, extended to at least its first `count` full blocks."""
        hashes, size = request.block_hashes, self.blocks.block_size
        while len(hashes) < count:
            index = len(hashes)
            parent = hashes[-1] if hashes else request.cache_salt
            hashes.append(block_hash(parent, request.token_at(index * size, (index + 1) * size)))
        return hashes

    def make_room(self, num_blocks: int) -> bool:
        """Preempts the newest running requests until num_blocks blocks are free (for work
        outside the plan, such as an embedding batch). False if even that is not enough."""
        while self.blocks.num_free < num_blocks and self.running:
            self._preempt_newest()
        return self.blocks.num_free >= num_blocks

    def lend_blocks(self, num_tokens: int, preempt: bool) -> list[int] | None:
        """KV blocks for num_tokens tokens of work outside the plan (an embedding input), lent
        until return_blocks. With preempt, the newest running requests are preempted until they
        fit. None when they cannot be had."""
        table: list[int] = []
        if self.blocks.grow(table, num_tokens) is None:
            if not preempt or not self.make_room(self.blocks.blocks_for(num_tokens)):
                return None
            self.blocks.grow(table, num_tokens)
        return table

    def return_blocks(self, block_ids: list[int]) -> None:
        self.blocks.free(block_ids)

    def _grow_or_preempt(self, request: Request, num_tokens: int, plan: StepPlan) -> list[int] | None:
        """Allocates blocks for the request's next chunk, preempting the newest running requests
        until they fit. Returns None when the request had to preempt itself."""
        while True:
            new_blocks = self.blocks.grow(request.block_ids, request.num_computed_tokens + num_tokens)
            if new_blocks is not None:
                return new_blocks
            victim = self._preempt_newest()
            plan.preempted.append(victim)
            if victim is request:
                return None

    def _preempt_newest(self) -> Request:
        victim = self.running.pop()
        self._release(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add(victim)
        return victim

    def _release(self, request: Request) -> None:
        """Frees the request's blocks: nothing of it is computed any more, and the tokens its
        steps in flight sample will be dropped."""
        self.blocks.free(request.block_ids)
        request.num_computed_tokens = 0
        request.num_in_flight_tokens = 0
        if request.known_to_replica:
            self._pending_free.append(request.seq_id)
            request.known_to_replica = False


def _tokens_left(request: Request) -> int:
    """Tokens the request may still be planned to sample: its max_new_tokens less those it has
    and those in flight."""
    return request.params.max_new_tokens - len(request.output_ids) - request.num_in_flight_tokens


def _can_step(request: Request) -> bool:
    """A running request can be given a step: its reader keeps up, and it may sample more."""
    return not request.held and _tokens_left(request) > 0
