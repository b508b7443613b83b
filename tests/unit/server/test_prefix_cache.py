"""Prefix caching: the block manager's hashes, references and LRU pool, and the scheduler's
sharing of cached blocks (across steps, within one step, after a preemption)."""

import copy
import hashlib
import random
from collections import Counter

import pytest

from shardgate.server.block_manager import BlockManager, block_hash
from shardgate.server.config import SchedulerConfig
from shardgate.server.request import FinishReason, Request, SamplingParams, Status
from shardgate.server.scheduler import Scheduler, StepPlan

PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0, ignore_eos=False, logprobs=False)


def chain(*blocks: list[int]) -> list[bytes]:
    hashes, parent = [], b""
    for tokens in blocks:
        parent = block_hash(parent, tokens)
        hashes.append(parent)
    return hashes


def request(seq_id: int, prompt: list[int], max_new_tokens: int = 8) -> Request:
    params = SamplingParams(max_new_tokens, 0.0, 1.0, 0, 0, False, False)
    return Request(seq_id, f"r{seq_id}", list(prompt), params)


def step(scheduler: Scheduler, token: int = 7):
    plan = scheduler.schedule()
    sampled = {c.request.seq_id: (token, 0.0) for c in plan.chunks if c.sample}
    return plan, scheduler.update(plan, sampled)


# --- block manager ------------------------------------------------------------------------


def test_block_hash_names_the_whole_prefix():
    [a] = chain([1, 2])
    assert a == chain([1, 2])[0] and len(a) == 32
    assert chain([9, 9], [1, 2])[1] != a  # same tokens after another block: another prefix
    assert chain([1, 2], [3, 4])[1] != chain([1, 2], [4, 3])[1]


def test_shared_block_is_counted_and_stays_cached_after_its_last_reference():
    blocks = BlockManager(4, 2)
    first: list[int] = []
    blocks.grow(first, 4)
    h0, h1 = chain([1, 2], [3, 4])
    blocks.register(first[0], h0)
    blocks.register(first[1], h1)
    second: list[int] = []
    assert blocks.take_cached(second, [h0, h1]) == 2 and second == first and blocks.num_free == 2
    blocks.free(first)
    assert blocks.num_free == 2  # still held by the second table
    blocks.free(second)
    assert blocks.num_free == 4 and blocks.usage == 0.0
    third: list[int] = []
    assert blocks.take_cached(third, chain([1, 2], [3, 4], [5, 6])) == 2 and blocks.num_free == 2  # from the LRU pool
    assert blocks.take_cached([], chain([2, 1])) == 0


def test_allocation_takes_free_blocks_first_then_evicts_least_recently_freed():
    blocks = BlockManager(4, 2)
    older, newer = [], []
    blocks.grow(older, 2)
    blocks.grow(newer, 2)
    [h_old], [h_new] = chain([1, 1]), chain([2, 2])
    blocks.register(older[0], h_old)
    blocks.register(newer[0], h_new)
    old_block = older[0]
    blocks.free(older)
    blocks.free(newer)
    table: list[int] = []
    assert blocks.grow(table, 4) == [2, 3]  # the never-cached blocks
    assert blocks.grow(table, 6) == [old_block]  # then the least recently freed cached one, forgotten
    assert blocks.take_cached([], [h_old]) == 0 and blocks.take_cached([], [h_new]) == 1


def test_a_chain_is_evicted_from_its_end():
    blocks = BlockManager(3, 2)
    table: list[int] = []
    blocks.grow(table, 6)
    hashes = chain([1, 1], [2, 2], [3, 3])
    for block, digest in zip(table, hashes):
        blocks.register(block, digest)
    head = table[0]
    blocks.free(table)
    blocks.grow(table, 4)  # evicts two blocks: the chain's last two
    assert head not in table
    assert blocks.take_cached([], hashes) == 1  # its start is still shared


def test_duplicate_content_stays_unregistered_and_is_freed_plainly():
    blocks = BlockManager(2, 2)
    a, b = [], []
    blocks.grow(a, 2)
    blocks.grow(b, 2)
    [digest] = chain([5, 5])
    blocks.register(a[0], digest)
    blocks.register(b[0], digest)  # same content computed twice: the first block keeps the name
    copy = b[0]
    blocks.free(b)
    blocks.free(a)
    table: list[int] = []
    assert blocks.grow(table, 2) == [copy]  # a plain free block, not the cached one
    assert blocks.take_cached([], [digest]) == 1


# --- scheduler ----------------------------------------------------------------------------


def test_a_later_request_starts_after_the_cached_prefix_with_the_whole_table():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64), blocks)
    prefix = list(range(100, 112))  # three full blocks
    first = request(1, prefix + [1, 2])
    scheduler.add(first)
    step(scheduler)
    second = request(2, prefix + [3, 4, 5, 6, 7])
    scheduler.add(second)
    plan, _ = step(scheduler)
    chunk = next(c for c in plan.chunks if c.request is second)
    assert (chunk.start_pos, chunk.num_tokens, chunk.is_new, chunk.sample) == (12, 5, True, True)
    assert chunk.new_block_ids == second.block_ids and second.block_ids[:3] == first.block_ids[:3]
    assert second.num_cached_tokens == 12 and first.num_cached_tokens == 0
    assert (scheduler.num_prefix_query_tokens, scheduler.num_prefix_hit_tokens) == (14 + 17, 12)
    scheduler.finish(first, FinishReason.LENGTH)
    assert blocks.num_free == 16 - 5  # the shared blocks are still held by the second request


def test_the_match_leaves_at_least_one_token_to_compute():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64), BlockManager(16, 4))
    prompt = list(range(100, 108))  # exactly two full blocks
    first = request(1, prompt)
    scheduler.add(first)
    step(scheduler)
    held = list(first.block_ids)
    scheduler.finish(first, FinishReason.LENGTH)
    again = request(2, prompt)
    scheduler.add(again)
    plan, updated = step(scheduler)
    [chunk] = plan.chunks
    # The second block is computed again, into a block of its own: shared blocks are never written.
    assert (chunk.start_pos, chunk.num_tokens) == (4, 4) and updated == [again] and again.num_cached_tokens == 4
    assert again.block_ids[0] == held[0] and again.block_ids[1] not in held


def test_requests_admitted_in_the_same_step_share_what_an_earlier_chunk_fills():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64), BlockManager(32, 4))
    prefix = list(range(100, 116))  # four full blocks
    requests = [request(i, prefix + [i, i + 1]) for i in range(1, 4)]
    for r in requests:
        scheduler.add(r)
    plan, updated = step(scheduler)
    assert [(c.start_pos, c.num_tokens) for c in plan.chunks] == [(0, 18), (16, 2), (16, 2)]
    assert all(r.block_ids[:4] == requests[0].block_ids[:4] for r in requests)
    assert len({r.block_ids[4] for r in requests}) == 3 and updated == requests
    assert plan.num_tokens == 22


def test_a_chunked_prefill_shares_only_the_blocks_it_has_filled():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=10), BlockManager(32, 4))
    prefix = list(range(100, 116))
    first, second = request(1, prefix + [1]), request(2, prefix + [2])
    scheduler.add(first)
    scheduler.add(second)
    plan, _ = step(scheduler)  # first: 10 tokens (two blocks filled); second: the rest of the budget is 0
    assert [(c.request, c.start_pos, c.num_tokens) for c in plan.chunks] == [(first, 0, 10)]
    plan, _ = step(scheduler)  # first: positions 10..16; second shares the four blocks filled by now
    assert [(c.request, c.start_pos, c.num_tokens) for c in plan.chunks] == [(first, 10, 7), (second, 16, 1)]
    assert second.block_ids[:4] == first.block_ids[:4] and second.num_cached_tokens == 16


def test_a_block_a_chunk_only_partly_fills_is_not_shared():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=10), BlockManager(32, 4))
    prompt = list(range(100, 117))
    first = request(1, prompt)
    scheduler.add(first)
    step(scheduler)  # positions 0..9: blocks 0 and 1 full, block 2 half written
    scheduler.finish(first, FinishReason.CANCELLED)
    second = request(2, prompt)
    scheduler.add(second)
    plan, _ = step(scheduler)
    assert [(c.request, c.start_pos) for c in plan.chunks] == [(second, 8)] and second.num_cached_tokens == 8


def test_no_sharing_without_prefix_caching():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, prefix_caching=False), BlockManager(32, 4))
    prefix = list(range(100, 116))
    for i in (1, 2):
        scheduler.add(request(i, prefix + [i]))
    plan, _ = step(scheduler)
    assert [(c.start_pos, c.num_tokens) for c in plan.chunks] == [(0, 17), (0, 17)]
    assert scheduler.num_prefix_query_tokens == 0 and all(c.request.num_cached_tokens == 0 for c in plan.chunks)


def test_admission_that_does_not_fit_gives_the_cached_prefix_back():
    blocks = BlockManager(6, 4)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64), blocks)
    prefix = list(range(100, 108))
    first = request(1, prefix + [1])
    scheduler.add(first)
    step(scheduler)  # 3 blocks held
    big = request(2, prefix + list(range(14)))  # shares 2 blocks, needs 4 more: 3 are free
    scheduler.add(big)
    plan, _ = step(scheduler)
    assert [c.request for c in plan.chunks] == [first] and big.status is Status.WAITING
    assert big.block_ids == [] and big.num_computed_tokens == 0 and blocks.num_free == 3
    scheduler.finish(first, FinishReason.LENGTH)
    plan, _ = step(scheduler)
    assert [(c.request, c.start_pos) for c in plan.chunks] == [(big, 8)] and big.num_cached_tokens == 8


# --- random schedules: exact accounting and exactly the right KV ---------------------------


class FakeReplica:
    """What each physical slot holds: the tokens of the sequence up to and including it (the
    identity of a position's keys and values). Keeps block tables from the plans as the shard
    does (whole on a sequence's first chunk, deltas after), and writes all chunks of a step
    before checking any context, as the shard's attention does in each layer."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[tuple | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tables: dict[int, list[int]] = {}

    def run(self, plan: StepPlan) -> None:
        size = self.block_size
        for seq_id in plan.free_seq_ids:
            del self.tables[seq_id]
        for chunk in plan.chunks:
            if chunk.is_new:
                self.tables[chunk.request.seq_id] = list(chunk.new_block_ids)
            else:
                self.tables[chunk.request.seq_id].extend(chunk.new_block_ids)
        for chunk in plan.chunks:
            tokens = chunk.request.token_at(0, chunk.start_pos + chunk.num_tokens)
            table = self.tables[chunk.request.seq_id]
            for pos in range(chunk.start_pos, chunk.start_pos + chunk.num_tokens):
                self.slots[table[pos // size]][pos % size] = tuple(tokens[: pos + 1])
        for chunk in plan.chunks:
            tokens = chunk.request.token_at(0, chunk.start_pos + chunk.num_tokens)
            table = self.tables[chunk.request.seq_id]
            for pos in range(chunk.start_pos + chunk.num_tokens):
                assert self.slots[table[pos // size]][pos % size] == tuple(tokens[: pos + 1]), (chunk, pos)

    def lend(self, table: list[int], num_tokens: int) -> None:
        for pos in range(num_tokens):
            self.slots[table[pos // self.block_size]][pos % self.block_size] = ("embedding",)


def check_accounting(blocks: BlockManager, holders: list[list[int]]) -> None:
    """The block manager's references match the holders' tables exactly, checked through its
    public methods on copies: the blocks no table holds are the ones an allocation can take,
    each once; and dropping the tables one at a time frees each block exactly when the last
    table holding it lets go. (That shared blocks hold the right tokens is FakeReplica's check.)"""
    held = Counter(block for table in holders for block in table)

    def unreferenced() -> list[int]:
        return [b for b in range(blocks.num_blocks) if held[b] <= 0]

    assert blocks.num_free == len(unreferenced())
    probe = copy.deepcopy(blocks)
    assert sorted(probe.grow([], blocks.num_free * blocks.block_size)) == unreferenced()  # each once, none held
    assert probe.num_free == 0
    probe = copy.deepcopy(blocks)
    for table in holders:
        probe.free(list(table))
        held.subtract(table)
        assert probe.num_free == len(unreferenced())
    assert sorted(probe.grow([], blocks.num_blocks * blocks.block_size)) == list(range(blocks.num_blocks))


@pytest.mark.parametrize("seed", range(12))
def test_random_schedules_keep_exact_accounting_and_read_the_right_kv(seed):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    blocks = BlockManager(rng.randint(12, 40), block_size)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=rng.choice([8, 16, 64]), max_num_seqs=rng.choice([2, 4, 8])), blocks)
    replica = FakeReplica(blocks.num_blocks, block_size)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(block_size, 12))] for _ in range(3)]
    live: list[Request] = []
    next_id = 1
    for _ in range(150):
        if rng.random() < 0.4 and len(live) < 12:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 6))]
            new = request(next_id, prompt, max_new_tokens=rng.randint(1, 10))
            next_id += 1
            scheduler.add(new)
            live.append(new)
        if rng.random() < 0.1:  # an embedding batch borrows blocks (making room if it must)
            lent: list[int] = []
            tokens = rng.randint(1, 3 * block_size)
            if blocks.grow(lent, tokens) is not None or (
                scheduler.make_room(blocks.blocks_for(tokens)) and blocks.grow(lent, tokens) is not None
            ):
                check_accounting(blocks, [r.block_ids for r in live] + [lent])
                replica.lend(lent, tokens)
                blocks.free(lent)
        plan = scheduler.schedule()
        check_accounting(blocks, [r.block_ids for r in live])
        for victim in [r for r in live if rng.random() < 0.05]:  # cancelled or expired while the step runs
            scheduler.finish(victim, FinishReason.CANCELLED)
            live.remove(victim)
        replica.run(plan)  # a planned chunk runs even if its request ended meanwhile
        sampled = {c.request.seq_id: (rng.randrange(50), 0.0) for c in plan.chunks if c.sample}
        for updated in scheduler.update(plan, sampled):
            if len(updated.output_ids) >= updated.params.max_new_tokens:
                scheduler.finish(updated, FinishReason.LENGTH)
                live.remove(updated)
        check_accounting(blocks, [r.block_ids for r in live])
    for r in list(live):
        scheduler.finish(r, FinishReason.CANCELLED)
    check_accounting(blocks, [])
    assert blocks.num_free == blocks.num_blocks
    assert scheduler.num_prefix_hit_tokens > 0


def test_only_requests_with_the_same_salt_share_blocks():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64), BlockManager(32, 4))
    prefix = list(range(100, 112))  # three full blocks
    salts = [b"", hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()]
    for seq_id, salt in enumerate(salts, 1):  # each salt's first request computes its own blocks
        first = request(seq_id, prefix + [seq_id])
        first.cache_salt = salt
        scheduler.add(first)
        step(scheduler)
        assert first.num_cached_tokens == 0
    for seq_id, salt in enumerate(salts, 10):
        again = request(seq_id, prefix + [seq_id])
        again.cache_salt = salt
        scheduler.add(again)
        step(scheduler)
        assert again.num_cached_tokens == 12
