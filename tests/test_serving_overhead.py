"""The serving path's measured overhead: its fit, its window of batch steps, how the profile
file carries it and how the simulator's clock (not its schedulers) adds it."""

from __future__ import annotations

import msgspec
import pytest
from tokenpool.bench.serving_overhead import BatchSample, batch_window_steps, fit_overhead
from tokenpool.bench.simulator import SimConfig, SimRequest, Simulation
from tokenpool.engine.step_profiler import InstanceTimings
from tokenpool.engine.step_time_model import (
    KVSwapTime,
    PrefillTimeModel,
    ServingOverhead,
    StepTable,
    StepTimeModel,
    TimingProfile,
)

PROFILE = TimingProfile(StepTimeModel(0.01, 0.0, 0.0), PrefillTimeModel(0.05, 0.0), 10**6)


def test_the_fit_recovers_a_line_in_batch_size_and_the_corun_extra():
    line = {1: 0.0013, 2: 0.0016, 4: 0.0022, 8: 0.0034}  # 1 ms + 0.3 ms per sequence beyond the profile
    samples = [BatchSample(b, False, 0.002 * b + extra, 0.002 * b) for b, extra in line.items()]
    samples += [BatchSample(b, True, 0.002 * b + line[b] + 0.0007, 0.002 * b) for b in (1, 4)]
    overhead = fit_overhead(samples, request_s=0.008)
    assert overhead.step_s == pytest.approx(0.001) and overhead.token_s == pytest.approx(0.0003)
    assert overhead.corun_step_s == pytest.approx(0.0007) and overhead.request_s == 0.008
    assert overhead.decode_step(0.008, 4, prefill_busy=True) == pytest.approx(0.008 + 0.001 + 0.0012 + 0.0007)


def test_a_decode_corun_factor_scales_the_engine_step_and_the_rest_is_added():
    line = {1: 0.0013, 4: 0.0022}
    samples = [BatchSample(b, False, 0.002 * b + extra, 0.002 * b) for b, extra in line.items()]
    samples += [BatchSample(4, True, 0.008 * 1.25 + line[4] + 0.0005, 0.008)]
    overhead = fit_overhead(samples, 0.0, corun_decode_factor=1.25)
    assert overhead.corun_decode_factor == 1.25 and overhead.corun_step_s == pytest.approx(0.0005)
    assert overhead.decode_step(0.1, 2, prefill_busy=False) == pytest.approx(0.1 + 0.001 + 0.0006)
    assert overhead.decode_step(0.1, 2, prefill_busy=True) == pytest.approx(0.125 + 0.001 + 0.0006 + 0.0005)
    with pytest.raises(ValueError, match="corun_decode_factor must be >= 1"):
        ServingOverhead(corun_decode_factor=0.5)


def test_the_fit_never_goes_negative():
    falling = [BatchSample(b, False, 0.01, 0.01 - 0.001 * b) for b in (1, 2, 4)]  # extra grows: fine
    assert fit_overhead(falling, 0.0).token_s == pytest.approx(0.001)
    faster = [BatchSample(b, False, 0.009 - 0.0001 * b, 0.01) for b in (1, 2, 4)]  # engine beats profile
    overhead = fit_overhead(faster + [BatchSample(1, True, 0.001, 0.01)], request_s=-0.002)
    assert overhead == ServingOverhead()
    with pytest.raises(ValueError, match="two or more batch sizes"):
        fit_overhead([BatchSample(1, False, 0.01, 0.009)], 0.0)


def test_batch_window_steps_take_the_span_where_every_stream_decodes():
    a = [1.0 + 0.01 * i for i in range(40)]  # first token at 1.0, every 10 ms
    b = [1.2 + 0.01 * i for i in range(40)]  # joins at 1.2
    tokens_together = [1.0 + 0.02 * i for i in range(20) for _ in range(2)]  # two tokens a response
    steps = batch_window_steps([(0.0, a), (0.0, b), (0.0, tokens_together)])
    assert steps[:2] == pytest.approx([0.01, 0.01])
    assert steps[2] == pytest.approx(0.01, rel=0.06)  # tokens in one response still count: span over tokens
    assert batch_window_steps([(0.0, a[:5]), (0.0, b)]) == []  # never together for 8 tokens


def test_the_profile_file_carries_the_overhead_and_refuses_a_negative_one():
    overhead = ServingOverhead(request_s=0.008, step_s=0.001, token_s=0.0003, corun_step_s=0.0007)
    data = InstanceTimings({"a": PROFILE}, 5.0, overhead).to_json(device="cpu")
    assert InstanceTimings.from_json(data).serving == overhead
    unmeasured = InstanceTimings({"a": PROFILE}, 5.0).to_json()
    assert InstanceTimings.from_json(unmeasured).serving == ServingOverhead()
    bad = msgspec.json.decode(data)
    bad["serving"]["token_s"] = -0.001
    with pytest.raises(ValueError, match="token_s must be >= 0"):
        InstanceTimings.from_json(msgspec.json.encode(bad), "bad.json")


def test_the_simulator_clock_adds_the_overhead_but_its_scheduler_predicts_without_it():
    overhead = ServingOverhead(request_s=0.02, step_s=0.001, token_s=0.002, corun_step_s=0.004)

    def run(serving, spec):
        timings = InstanceTimings({"a": PROFILE}, 1.0, serving)
        sim = Simulation(SimConfig("aegaeon", 1, 1, tbt_s=0.05), timings, ["a"])
        reqs = [SimRequest(f"r{i}", "a", t, 16, n) for i, (t, n) in enumerate(spec)]
        sim.run(reqs)
        return sim, reqs

    _, (plain,) = run(ServingOverhead(), [(0.0, 4)])
    sim, (slow,) = run(overhead, [(0.0, 4)])
    assert slow.token_times[0] == pytest.approx(plain.token_times[0] + 0.02)  # first token's way out
    assert [b - a for a, b in zip(slow.token_times[1:], slow.token_times[2:], strict=False)] == \
        pytest.approx([0.01 + 0.001 + 0.002] * 2)  # a batch of one, no prefill running
    assert sim.timings.step_seconds(sim.decode[0].runner.batch("a")) == pytest.approx(0.01)
    # A second request's prefill (0.05 s) runs while the first decodes: those steps pay corun.
    _, (first, _) = run(overhead, [(0.0, 20), (0.1, 1)])
    gaps = [round(b - a, 6) for a, b in zip(first.token_times[1:], first.token_times[2:], strict=False)]
    assert round(0.013 + 0.004, 6) in gaps and round(0.013, 6) in gaps


def test_a_step_table_interpolates_extrapolates_and_adds_context():
    table = StepTable(context=64, batches=(1, 2, 4, 8), seconds=(0.065, 0.107, 0.160, 0.196), per_token=1e-5)
    assert table.predict(64, 1) == pytest.approx(0.065)
    assert table.predict(3 * 64, 3) == pytest.approx((0.107 + 0.160) / 2)
    assert table.predict(10 * 64, 10) == pytest.approx(0.196 + 2 * 0.036 / 4)  # the last two's slope
    assert table.predict(64 + 100, 1) == pytest.approx(0.065 + 100e-5)
    assert table.predict(1, 1) == pytest.approx(0.065 - 63e-5)
    for bad in (dict(batches=(1,), seconds=(0.1,)), dict(batches=(2, 1), seconds=(0.1, 0.2)),
                dict(batches=(1, 2), seconds=(0.1, 0.0)),
                dict(batches=(1, 2), seconds=(0.1, 0.2), per_token=-1)):
        with pytest.raises(ValueError, match="step table"):
            StepTable(**{"context": 64, "per_token": 0.0, **bad})


def test_the_clock_steps_by_the_table_and_the_schedulers_by_the_line():
    table = StepTable(context=16, batches=(1, 2), seconds=(0.004, 0.005), per_token=0.0)
    timings = InstanceTimings({"a": PROFILE, "b": PROFILE}, 1.0, step_tables={"a": table})
    assert timings.clock_step_seconds("a", 32, 2) == pytest.approx(0.005)
    assert timings.clock_step_seconds("b", 32, 2) == pytest.approx(0.01)  # no table: the line
    again = InstanceTimings.from_json(timings.to_json())
    assert again.step_tables == {"a": table}
    with pytest.raises(ValueError, match="step tables for models without a profile: c"):
        InstanceTimings({"a": PROFILE}, 1.0, step_tables={"c": table})
    sim = Simulation(SimConfig("aegaeon", 1, 1, tbt_s=0.05), timings, ["a"])
    (seq,) = reqs = [SimRequest("r0", "a", 0.0, 16, 4)]
    sim.run(reqs)
    gaps = [b - a for a, b in zip(seq.token_times[1:], seq.token_times[2:], strict=False)]
    assert gaps == pytest.approx([0.004] * 2)


def test_a_prefill_slows_by_the_corun_factor_only_while_a_decode_instance_has_work():
    overhead = ServingOverhead(corun_prefill_factor=1.5)
    timings = InstanceTimings({"a": PROFILE}, 1.0, overhead)
    sim = Simulation(SimConfig("aegaeon", 1, 1, tbt_s=0.05), timings, ["a"])
    # r0's prefill runs on an idle fleet; r1 arrives while r0 decodes (40 steps of 10 ms).
    reqs = [SimRequest("r0", "a", 0.0, 16, 40), SimRequest("r1", "a", 0.2, 16, 1)]
    sim.run(reqs)
    switch = PROFILE.weight_bytes / 1e9
    assert reqs[0].token_times[0] == pytest.approx(switch + 0.05)
    assert reqs[1].token_times[0] == pytest.approx(0.2 + 0.05 * 1.5)
    with pytest.raises(ValueError, match="corun_prefill_factor must be >= 1"):
        ServingOverhead(corun_prefill_factor=0.9)


def test_kv_swap_times_count_whole_blocks_and_bad_ones_are_refused():
    times = KVSwapTime(block_size=16, block_bytes=1000, out_gbps=1.0, in_gbps=2.0)
    assert times.seconds(17, "out") == pytest.approx(2e-6)  # 17 tokens take two blocks
    assert times.seconds(16, "in") == pytest.approx(0.5e-6)
    timings = InstanceTimings({"a": PROFILE, "b": PROFILE}, 1.0, kv_swap={"a": times})
    assert timings.kv_swap_seconds("b", 100, "out") == 0.0  # not measured: free, as before
    assert InstanceTimings.from_json(timings.to_json()).kv_swap == {"a": times}
    with pytest.raises(ValueError, match="KV swap times for models without a profile: c"):
        InstanceTimings({"a": PROFILE}, 1.0, kv_swap={"c": times})
    for bad in (dict(block_size=0), dict(block_bytes=0), dict(out_gbps=0.0), dict(in_gbps=-1.0)):
        with pytest.raises(ValueError, match="KV swap times need"):
            KVSwapTime(**{"block_size": 16, "block_bytes": 1000, "out_gbps": 1.0, "in_gbps": 1.0, **bad})


def _run(timings, reqs, models):
    Simulation(SimConfig("aegaeon", 1, 1, tbt_s=0.05), timings, models).run(reqs)
    return reqs


def test_a_decode_step_waits_for_kv_in_and_a_switch_for_kv_out():
    # 17 tokens (prompt and first token) are two blocks: 0.1 s out, 0.05 s in per sequence.
    swap = KVSwapTime(block_size=16, block_bytes=10**7, out_gbps=0.2, in_gbps=0.4)
    free = InstanceTimings({"a": PROFILE, "b": PROFILE}, 1.0)
    slow = InstanceTimings({"a": PROFILE, "b": PROFILE}, 1.0, kv_swap={"a": swap, "b": swap})
    # One model: the handed-over sequence's KV comes in before its first decode step.
    base, swapped = (_run(t, [SimRequest("r0", "a", 0.0, 16, 4)], ["a"]) for t in (free, slow))
    assert swapped[0].token_times[1] - base[0].token_times[1] == pytest.approx(0.05)
    assert swapped[0].token_times[2] - swapped[0].token_times[1] == pytest.approx(0.01)  # then none
    # Two models turning: every switch away from a live batch waits for its KV to go out and
    # the incoming batch's to come in, so tokens come later.
    spec = [("r0", "a", 0.0, 16, 60), ("r1", "b", 0.0, 16, 60)]
    base, swapped = (_run(t, [SimRequest(*s) for s in spec], ["a", "b"]) for t in (free, slow))
    assert all(len(r.token_times) == 60 for r in base + swapped)
    assert swapped[0].token_times[-1] > base[0].token_times[-1] + 0.15


def test_a_prefill_instance_prefetches_the_next_group_and_the_copy_costs_its_compute():
    # Switches take 0.1 s (1 MB at 0.01 GB/s); a and b arrive together; prefills take 0.05 s.
    first_tokens = {}
    for factor in (0.0, 1.0):
        timings = InstanceTimings({"a": PROFILE, "b": PROFILE}, 0.01, ServingOverhead(prefetch_factor=factor))
        reqs = [SimRequest("r0", "a", 0.0, 16, 1), SimRequest("r1", "b", 0.0, 16, 1)]
        _run(timings, reqs, ["a", "b"])
        first_tokens[factor] = [r.token_times[0] for r in reqs]
    # a: a cold switch, then its prefill while b is copied into the free slot; b: the rest of the copy.
    assert first_tokens[0.0] == pytest.approx([0.1 + 0.05, 0.1 + 0.05 + 0.05 + 0.05])
    # The copy costs a's prefill its 0.1 s; by then b's slot is ready.
    assert first_tokens[1.0] == pytest.approx([0.1 + 0.05 + 0.1, 0.1 + 0.15 + 0.05])
    with pytest.raises(ValueError, match="prefetch_factor must be >= 0"):
        ServingOverhead(prefetch_factor=-0.1)


def test_a_batch_whose_streams_never_overlap_is_measured_again_with_longer_streams():
    """The second stream's first token comes 1 s in; at 10 ms a token, 64-token streams end
    first, so batch_step doubles the length until they decode together, and counts only the
    batches that did (three of them, as asked)."""
    import asyncio

    from tokenpool.bench.serving_overhead import OUTPUT_TOKENS, _Client

    class Fake:
        calls: list[int] = []
        room = {"m": 10_000}

        async def stream(self, model, text, max_tokens):
            first = 1.0 if len(self.calls) % 2 else 0.0
            self.calls.append(max_tokens)
            return 0.0, [first + 0.01 * i for i in range(max_tokens)]

    fake = Fake()
    contexts = []
    sample = asyncio.run(_Client.batch_step(fake, "m", 10, 2, False, lambda c, b: contexts.append(c) or 0.0,
                                            repeats=3))
    assert fake.calls == [OUTPUT_TOKENS] * 2 + [2 * OUTPUT_TOKENS] * 6
    assert sample.step_s == pytest.approx(0.01) and contexts == [2 * (10 + OUTPUT_TOKENS)]


def test_a_batch_that_never_overlaps_at_any_length_is_an_error():
    import asyncio

    from tokenpool.bench.serving_overhead import MAX_OUTPUT_GROWTH, OUTPUT_TOKENS, _Client

    class Apart:
        calls = 0
        room = {"m": 10_000}
        asked: list[int] = []

        async def stream(self, model, text, max_tokens):
            self.calls += 1
            self.asked.append(max_tokens)
            return 0.0, [1e6 * (self.calls % 2) + 0.01 * i for i in range(max_tokens)]

    with pytest.raises(RuntimeError, match=f"streams of up to {MAX_OUTPUT_GROWTH * OUTPUT_TOKENS}"):
        asyncio.run(_Client.batch_step(Apart(), "m", 10, 2, False, lambda c, b: 0.0, repeats=5))
    # A model whose context holds fewer tokens: the streams grow only to what it holds (a stream asked
    # for more would end short of max_tokens, which the measurement refuses).
    small = Apart()
    small.room, small.asked = {"m": 3 * OUTPUT_TOKENS}, []
    with pytest.raises(RuntimeError, match=f"streams of up to {3 * OUTPUT_TOKENS}"):
        asyncio.run(_Client.batch_step(small, "m", 10, 2, False, lambda c, b: 0.0, repeats=5))
    assert max(small.asked) == 3 * OUTPUT_TOKENS

