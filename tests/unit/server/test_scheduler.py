import pytest

from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig
from shardgate.server.request import FinishReason, Request, SamplingParams, Status
from shardgate.server.scheduler import Scheduler

PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0, ignore_eos=False, logprobs=False)


def make(seq_id: int, prompt_len: int) -> Request:
    """A request whose prompt shares no block with another seq_id's."""
    return Request(seq_id, f"r{seq_id}", [seq_id * 1000 + i for i in range(prompt_len)], PARAMS)


def run_step(scheduler: Scheduler, token: int = 7):
    plan = scheduler.schedule()
    sampled = {c.request.seq_id: (token, -0.5) for c in plan.chunks if c.sample}
    return plan, scheduler.update(plan, sampled)


def test_prefill_then_decode_with_block_growth():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, decode_steps=1), BlockManager(10, 4))
    request = make(1, 6)
    scheduler.add(request)
    plan, updated = run_step(scheduler)
    [chunk] = plan.chunks
    assert (chunk.start_pos, chunk.num_tokens, chunk.sample, chunk.is_new) == (0, 6, True, True)
    assert chunk.new_block_ids == request.block_ids and len(request.block_ids) == 2
    assert updated == [request] and request.output_ids == [7] and request.num_computed_tokens == 6
    plan, _ = run_step(scheduler)  # position 6 still fits in block 2
    assert plan.chunks[0].num_tokens == 1 and plan.chunks[0].new_block_ids == [] and not plan.chunks[0].is_new
    run_step(scheduler)  # position 7
    plan, _ = run_step(scheduler)  # position 8 needs a third block
    assert len(plan.chunks[0].new_block_ids) == 1 and len(request.block_ids) == 3


def test_chunked_prefill_under_token_budget_and_decodes_first():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=8, max_num_seqs=4), BlockManager(32, 4))
    first, second = make(1, 3), make(2, 20)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.add(second)
    plan, _ = run_step(scheduler)
    assert [(c.request.seq_id, c.num_tokens, c.sample) for c in plan.chunks] == [(1, 1, True), (2, 7, False)]
    plan, _ = run_step(scheduler)
    assert [(c.request.seq_id, c.start_pos, c.num_tokens) for c in plan.chunks] == [(1, 4, 1), (2, 7, 7)]
    plan, updated = run_step(scheduler)
    assert [(c.request.seq_id, c.start_pos, c.num_tokens, c.sample) for c in plan.chunks] == [(1, 5, 1, True), (2, 14, 6, True)]
    assert second in updated and second.output_ids == [7]


def test_max_num_seqs_caps_admission():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=100, max_num_seqs=2), BlockManager(32, 4))
    for i in range(3):
        scheduler.add(make(i, 2))
    plan, _ = run_step(scheduler)
    assert len(plan.chunks) == 2 and len(scheduler.waiting) == 1


def test_finish_frees_blocks_and_tells_replica_once():
    blocks = BlockManager(8, 4)
    scheduler = Scheduler(SchedulerConfig(), blocks)
    request = make(1, 9)
    scheduler.add(request)
    run_step(scheduler)
    assert blocks.num_free == 5
    scheduler.finish(request, FinishReason.LENGTH)
    assert blocks.num_free == 8 and request.status is Status.FINISHED and not scheduler.has_work()
    scheduler.finish(request, FinishReason.CANCELLED)  # idempotent
    assert request.finish_reason is FinishReason.LENGTH
    plan = scheduler.schedule()
    assert plan.free_seq_ids == [1] and plan.chunks == []
    assert scheduler.schedule().free_seq_ids == []


def test_cancel_while_queued_never_reaches_replica():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1), BlockManager(8, 4))
    running, queued = make(1, 2), make(2, 2)
    scheduler.add(running)
    scheduler.add(queued)
    run_step(scheduler)
    scheduler.finish(queued, FinishReason.CANCELLED)
    plan, _ = run_step(scheduler)
    assert [c.request for c in plan.chunks] == [running] and plan.free_seq_ids == []


def test_abort_during_step_skips_its_results():
    scheduler = Scheduler(SchedulerConfig(), BlockManager(8, 4))
    request = make(1, 2)
    scheduler.add(request)
    plan = scheduler.schedule()
    scheduler.finish(request, FinishReason.CANCELLED)  # while the step is "in flight"
    assert scheduler.update(plan, {1: (5, 0.0)}) == [] and request.output_ids == []
    assert scheduler.schedule().free_seq_ids == [1]


def test_preempts_newest_when_blocks_run_out():
    blocks = BlockManager(4, 2)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4), blocks)
    old, new = make(1, 4), make(2, 3)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # old: 2 blocks, new: 2 blocks, cache full
    assert blocks.num_free == 0
    plan, _ = run_step(scheduler)  # old at position 4 needs a 3rd block: new is preempted
    assert plan.preempted == [new] and plan.free_seq_ids == [2] and [c.request for c in plan.chunks] == [old]
    assert new.status is Status.WAITING and new.num_computed_tokens == 0 and new.block_ids == []
    assert scheduler.num_preemptions == 1 and new.output_ids == [7] and list(scheduler.waiting) == [new]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_request_resumes_with_recompute(prefix_caching):
    blocks = BlockManager(5, 2)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, prefix_caching=prefix_caching, decode_steps=1), blocks)
    old, new = make(1, 4), make(2, 3)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)
    run_step(scheduler)  # old takes the last free block
    held = list(new.block_ids)
    plan, _ = run_step(scheduler)  # new needs a block for position 4: it is the newest, so it yields
    assert plan.preempted == [new] and plan.free_seq_ids == [2] and [c.request for c in plan.chunks] == [old]
    scheduler.finish(old, FinishReason.LENGTH)
    plan, updated = run_step(scheduler)
    [chunk] = plan.chunks
    assert chunk.request is new and chunk.is_new and plan.free_seq_ids == [1]
    if prefix_caching:  # its two full blocks (prompt + first output) are still cached: only position 4 is computed
        assert (chunk.start_pos, chunk.num_tokens) == (4, 1) and chunk.new_block_ids[:2] == held and len(chunk.new_block_ids) == 3
        assert new.num_cached_tokens == 0  # counted at the first run only
    else:
        assert (chunk.start_pos, chunk.num_tokens) == (0, 5) and len(chunk.new_block_ids) == 3
    assert chunk.sample and updated == [new] and new.output_ids == [7, 7, 7]


def test_block_manager_refuses_without_side_effects():
    blocks = BlockManager(3, 4)
    table: list[int] = []
    assert blocks.grow(table, 20) is None and table == [] and blocks.num_free == 3
    assert blocks.grow(table, 9) == [0, 1, 2] and blocks.usage == 1.0
    blocks.free(table)
    assert table == [] and blocks.num_free == 3


def make_at(seq_id: int, arrival: float, priority: int = 0, prompt_len: int = 2) -> Request:
    return Request(seq_id, f"r{seq_id}", list(range(1, prompt_len + 1)), PARAMS, priority=priority, arrival=arrival)


def test_waiting_requests_run_by_priority_fifo_within_a_level():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, priority_aging_s=10.0), BlockManager(32, 4))
    low, high, high_later, low_later = make_at(1, 0.0), make_at(2, 1.0, 5), make_at(3, 2.0, 5), make_at(4, 3.0)
    for request in (low, high, high_later, low_later):
        scheduler.add(request)
    order = []
    while scheduler.has_work():
        plan, _ = run_step(scheduler)
        order.append(plan.chunks[0].request)
        scheduler.finish(plan.chunks[0].request, FinishReason.LENGTH)
    assert order == [high, high_later, low, low_later] and scheduler.num_started == 4


def test_aging_lets_an_old_low_priority_request_pass_newer_high_ones():
    # With aging 1 s, priority 3 counts as arriving 3 s earlier: a priority-0 request that has
    # waited longer than that goes first.
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, priority_aging_s=1.0), BlockManager(32, 4))
    old_low, high = make_at(1, 0.0), make_at(2, 3.5, 3)
    scheduler.add(high)
    scheduler.add(old_low)
    assert list(scheduler.waiting) == [old_low, high]
    newer_high = make_at(3, 2.5, 3)  # arrived within 3 s of old_low: overtakes it
    scheduler.add(newer_high)
    assert list(scheduler.waiting) == [newer_high, old_low, high]


def test_make_room_preempts_the_newest_running_requests():
    blocks = BlockManager(6, 2)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64), blocks)
    old, new = make(1, 4), make(2, 4)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)
    assert blocks.num_free == 2
    assert scheduler.make_room(4)
    assert scheduler.running == [old] and list(scheduler.waiting) == [new] and blocks.num_free == 4
    assert new.block_ids == [] and scheduler.num_preemptions == 1
    assert scheduler.schedule().free_seq_ids == [2]
    assert not scheduler.make_room(7)  # more than the cache holds: everything preempted, still short
    assert scheduler.running == [] and blocks.num_free == 6


def test_decodes_run_several_steps_only_when_nothing_waits():
    blocks = BlockManager(32, 4)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, decode_steps=4), blocks)
    first = make(1, 3)
    scheduler.add(first)
    plan, _ = run_step(scheduler)
    assert plan.num_steps == 1  # a prefill
    plan = scheduler.schedule()
    assert plan.num_steps == 4 and len(first.block_ids) == 2  # positions 3..6: a second block for the run
    assert plan.chunks[0].new_block_ids == [first.block_ids[1]] and plan.num_tokens == 4
    for _ in range(4):
        scheduler.update(plan, {1: (7, 0.0)})
    assert first.num_computed_tokens == 7 and first.output_ids == [7] * 5
    scheduler.add(make(2, 3))
    plan, _ = run_step(scheduler)
    assert plan.num_steps == 1 and len(plan.chunks) == 2  # a request was waiting: it joins at once


@pytest.mark.parametrize("num_blocks, steps, blocks_held", [(3, 7, 3), (2, 1, 1)])
def test_a_decode_run_stops_at_max_new_tokens_and_needs_its_blocks(num_blocks, steps, blocks_held):
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, decode_steps=8), BlockManager(num_blocks, 4))
    request = make(1, 3)  # max_new_tokens 8: the prefill samples one, 7 to go, at positions 3..9
    scheduler.add(request)
    run_step(scheduler)
    plan = scheduler.schedule()
    assert plan.num_steps == steps and len(request.block_ids) == blocks_held  # 7 steps need all 3 blocks


def test_a_held_request_gets_no_step_and_keeps_its_blocks():
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, decode_steps=4), BlockManager(32, 4))
    running, queued, other = make(1, 3), make(2, 3), make(3, 3)
    scheduler.add(running)
    run_step(scheduler)
    blocks = list(running.block_ids)
    running.held = queued.held = True
    scheduler.add(queued)
    assert not scheduler.has_work()  # nothing can run: the engine sleeps until a stream drains
    scheduler.add(other)
    plan, _ = run_step(scheduler)
    assert [c.request for c in plan.chunks] == [other] and queued in scheduler.waiting
    assert running.block_ids == blocks and running.output_ids == [7]
    plan, _ = run_step(scheduler)
    assert plan.num_steps == 4  # a held waiting request does not stop a decode run
    running.held = queued.held = False
    plan, _ = run_step(scheduler)
    assert {c.request.seq_id for c in plan.chunks} == {1, 2, 3}
