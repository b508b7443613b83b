"""The scheduler with steps in flight (async scheduling): the next plan is made before the answer
of the one before is applied."""

from shardgate.server.block_manager import BlockManager
from shardgate.server.config import SchedulerConfig
from shardgate.server.request import FinishReason, Request, SamplingParams, Status
from shardgate.server.scheduler import Scheduler


def make(seq_id: int, prompt_len: int, max_new_tokens: int = 8) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0, ignore_eos=False, logprobs=False)
    return Request(seq_id, f"r{seq_id}", [seq_id * 1000 + i for i in range(prompt_len)], params)


def scheduler_of(num_blocks: int = 16, decode_steps: int = 1, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, decode_steps=decode_steps, **config), BlockManager(num_blocks, 4))


def answer(scheduler: Scheduler, plan, token: int) -> list[Request]:
    """Applies a plan's steps as the replica answers them: `token` for every sampled chunk."""
    updated = []
    for _ in range(plan.num_steps):
        updated += scheduler.update(plan, {c.request.seq_id: (token, 0.0) for c in plan.chunks if c.sample})
    return updated


def test_the_next_plan_decodes_the_token_in_flight_at_its_position_with_blocks_for_it():
    scheduler = scheduler_of()
    request = make(1, 4)
    scheduler.add(request)
    prefill = scheduler.schedule()
    decode = scheduler.schedule()  # before the prefill's token is known
    [chunk] = decode.chunks
    assert (chunk.start_pos, chunk.num_tokens, chunk.sample, chunk.last_sampled_input, chunk.output_index) == (4, 1, True, True, 1)
    assert len(chunk.new_block_ids) == 1 and len(request.block_ids) == 2  # position 4 opens a second block
    assert request.num_computed_tokens == 5 and request.num_in_flight_tokens == 2 and request.output_ids == []
    assert answer(scheduler, prefill, 71) == [request] and request.output_ids == [71] and request.num_in_flight_tokens == 1
    third = scheduler.schedule()
    assert [(c.start_pos, c.output_index, c.last_sampled_input) for c in third.chunks] == [(5, 2, True)]
    answer(scheduler, decode, 72)
    answer(scheduler, third, 73)
    assert request.output_ids == [71, 72, 73] and request.num_in_flight_tokens == 0 and request.num_computed_tokens == 6
    assert [(c.start_pos, c.output_index, c.last_sampled_input) for c in scheduler.schedule().chunks] == [(6, 3, False)]


def test_a_request_whose_last_token_is_in_flight_gets_no_more_steps():
    scheduler = scheduler_of()
    request = make(1, 3, max_new_tokens=2)
    scheduler.add(request)
    first, second = scheduler.schedule(), scheduler.schedule()
    assert [c.request for c in second.chunks] == [request] and not scheduler.has_work()
    assert scheduler.schedule().chunks == []
    answer(scheduler, first, 5)
    assert not scheduler.has_work()  # the engine ends it at its second token; nothing was computed past it


def test_a_decode_run_in_flight_counts_all_its_tokens():
    scheduler = scheduler_of(decode_steps=4)
    request = make(1, 3, max_new_tokens=7)
    scheduler.add(request)
    scheduler.schedule()  # the prefill: its token in flight
    run = scheduler.schedule()
    assert run.num_steps == 4 and request.num_in_flight_tokens == 5 and request.num_computed_tokens == 3 + 4
    [chunk] = scheduler.schedule().chunks  # the last two tokens: one step (a run only when nothing waits, up to the limit)
    assert (chunk.start_pos, chunk.output_index, chunk.last_sampled_input) == (7, 5, True)


def test_a_request_that_ends_while_its_next_step_runs_drops_that_token_and_frees_its_blocks():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(SchedulerConfig(decode_steps=1), blocks)
    ending, other = make(1, 4), make(2, 4)
    scheduler.add(ending)
    scheduler.add(other)
    first, second = scheduler.schedule(), scheduler.schedule()
    answer(scheduler, first, 9)
    scheduler.finish(ending, FinishReason.EOS)  # what the engine does when 9 is EOS
    assert ending.block_ids == [] and ending.num_in_flight_tokens == 0
    third = scheduler.schedule()  # planned while the second step runs
    assert [c.request for c in third.chunks] == [other] and third.free_seq_ids == [1]
    assert answer(scheduler, second, 10) == [other] and ending.output_ids == [9]
    answer(scheduler, third, 11)
    assert other.output_ids == [9, 10, 11] and blocks.num_free == 16 - len(other.block_ids)


def test_a_request_preempted_with_a_token_in_flight_drops_it_and_is_recomputed_from_what_it_has():
    blocks = BlockManager(4, 2)
    scheduler = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, decode_steps=1), blocks)
    old, new = make(1, 4), make(2, 3)
    scheduler.add(old)
    scheduler.add(new)
    first = scheduler.schedule()  # old: 2 blocks, new: 2 blocks, the cache is full
    second = scheduler.schedule()  # old decodes its token in flight at position 4: new is preempted for the block
    assert second.preempted == [new] and second.free_seq_ids == [2] and [c.request for c in second.chunks] == [old]
    assert new.status is Status.WAITING and new.num_in_flight_tokens == 0 and new.num_computed_tokens == 0
    assert answer(scheduler, first, 5) == [old] and new.output_ids == []  # its token of the first step is dropped
    answer(scheduler, second, 6)
    scheduler.finish(old, FinishReason.LENGTH)
    [again] = scheduler.schedule().chunks
    # Its prompt again (its first block from the prefix cache), to draw its first token anew.
    assert again.request is new and again.is_new and (again.start_pos, again.num_tokens, again.output_index) == (2, 1, 0)


def test_the_block_a_decode_of_a_token_in_flight_fills_is_cached_once_that_token_is_known():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(SchedulerConfig(decode_steps=1), blocks)
    request = make(1, 3)
    scheduler.add(request)
    prefill, decode = scheduler.schedule(), scheduler.schedule()  # the decode fills block 0 (positions 0-3)
    answer(scheduler, prefill, 40)
    answer(scheduler, decode, 41)
    scheduler.finish(request, FinishReason.STOP)
    twin = Request(2, "r2", request.prompt_ids + [40, 99], request.params)
    scheduler.add(twin)
    [chunk] = scheduler.schedule().chunks
    assert (chunk.start_pos, chunk.num_tokens) == (4, 1)  # the prompt and the token decoded in flight came from the cache
