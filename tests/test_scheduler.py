"""Scheduler and block manager as pure logic: no model, no tensors."""

from __future__ import annotations

import pytest
from tokenpool.engine.block_manager import BlockManager
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.scheduler import Scheduler, SchedulerConfig
from tokenpool.engine.sequence import Sequence, SequenceStatus


def seq(n: int) -> Sequence:
    return Sequence(list(range(n)), SamplingParams())


def run_plan(plan, token=7):
    """Play the runner: advance counters, append a token where the chunk completes."""
    for chunk in plan.chunks:
        done = chunk.completes
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if done:
            chunk.seq.token_ids.append(token)


def test_blocks_follow_token_counts():
    blocks = BlockManager(num_blocks=4, block_size=16)
    s = seq(17)
    blocks.grow(s, 17)
    assert len(s.block_table) == 2 and blocks.num_free_blocks == 2
    blocks.grow(s, 32)
    assert len(s.block_table) == 2
    with pytest.raises(MemoryError):
        blocks.grow(s, 16 * 5)
    blocks.release(s)
    assert blocks.num_free_blocks == 4 and s.block_table == []


def test_long_prompts_are_chunked_to_the_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10), BlockManager(16, 4))
    a = seq(25)
    sched.add(a)
    sizes = []
    while a.num_output_tokens == 0:
        plan = sched.schedule()
        sizes.append(plan.num_tokens)
        run_plan(plan)
    assert sizes == [10, 10, 5]


def test_decodes_first_then_new_prompts_within_limits():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64),
                      BlockManager(32, 4))
    a, b, c = seq(5), seq(6), seq(7)
    for s in (a, b, c):
        sched.add(s)
    run_plan(sched.schedule())
    assert [s.status for s in (a, b, c)] == [SequenceStatus.RUNNING] * 2 + [SequenceStatus.WAITING]
    plan = sched.schedule()
    assert [(ch.seq, ch.num_tokens) for ch in plan.chunks] == [(a, 1), (b, 1)]
    sched.finish(a)
    run_plan(plan)
    plan = sched.schedule()
    assert [(ch.seq, ch.num_tokens) for ch in plan.chunks] == [(b, 1), (c, 7)]


def test_the_latest_sequence_is_preempted_when_blocks_run_out():
    sched = Scheduler(SchedulerConfig(), BlockManager(num_blocks=3, block_size=4))
    a, b = seq(4), seq(4)
    sched.add(a)
    sched.add(b)
    run_plan(sched.schedule())  # each holds one full block; one block left
    run_plan(sched.schedule())  # a takes the last block for token 5; b has none: preempted
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and sched.waiting[0] is b
    assert a.status is SequenceStatus.RUNNING
