"""The fleet simulator drives the real scheduler classes on a simulated clock."""

from __future__ import annotations

import pytest
from tokenpool.bench.metrics import SLO, summarize
from tokenpool.bench.simulator import SimConfig, SimRequest, Simulation
from tokenpool.engine.step_profiler import InstanceTimings
from tokenpool.engine.step_time_model import PrefillTimeModel, StepTimeModel, TimingProfile

PROFILE = TimingProfile(StepTimeModel(0.01, 0.0, 0.0), PrefillTimeModel(0.05, 0.0), 10**9)
PROFILES = {"a": PROFILE, "b": PROFILE, "c": PROFILE}
SWITCH = 0.2
TIMINGS = InstanceTimings(PROFILES, copy_gbps=PROFILE.weight_bytes / SWITCH / 1e9)  # switches take SWITCH s


def requests(spec):
    """spec: (arrival, model, max_tokens) each."""
    return [SimRequest(f"r{i}", m, t, 16, n) for i, (t, m, n) in enumerate(spec)]


def simulate(policy, spec, num_prefill=1, num_decode=1, models=("a", "b"), tbt=0.05, qmax=0.5):
    config = SimConfig(policy, num_prefill, num_decode, tbt, qmax)
    sim = Simulation(config, TIMINGS, models)
    reqs = requests(spec)
    return sim, reqs, sim.run(reqs)


def test_a_lone_request_gets_prefill_then_one_token_per_step():
    _, reqs, results = simulate("aegaeon", [(0.0, "a", 5)])
    times = reqs[0].token_times
    assert results[0].finished and len(times) == 5
    assert times[0] == pytest.approx(SWITCH + 0.05)  # the prefill instance switched to a, then prefilled
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    assert gaps == pytest.approx([0.01] * 3)


def test_aegaeon_interleaves_models_while_request_level_blocks_behind_the_long_one():
    spec = [(0.0, "a", 400), (0.5, "b", 5)]
    sim, reqs, _ = simulate("aegaeon", spec)
    assert reqs[1].token_times[-1] < reqs[0].token_times[-1]  # b finished while a was still running
    assert sim.decode[0].runner.switches >= 3
    _, reqs, _ = simulate("request", spec)
    assert reqs[1].token_times[0] >= reqs[0].token_times[-1]  # b's first token waited for all of a


def test_static_pins_models_and_never_switches_after_the_first_load():
    sim, reqs, results = simulate("static", [(0.0, "a", 20), (0.1, "b", 20), (0.2, "a", 20)],
                                  num_prefill=2, num_decode=2)
    assert all(r.finished for r in results)
    assert [d.runner.switches for d in sim.decode] == [1, 1]


def test_mean_tbt_of_two_rotating_batches_stays_within_alpha_times_the_target():
    """The scheduler plans each round so that a batch's mean time between tokens is alpha x d
    with the predicted switch times; two models both stay in the arena's slots, so after the
    first copies their switches are free and the mean comes in under the plan, never over it."""
    sim, reqs, results = simulate("aegaeon", [(0.0, "a", 600), (0.0, "b", 600)], tbt=0.05, qmax=0.5)
    alpha = sim.decode[0].policy.last.plan.alpha
    for r in reqs:
        middle = r.token_times[100:500]
        assert 0.01 < (middle[-1] - middle[0]) / (len(middle) - 1) <= alpha * 0.05 * 1.05
    assert sim.decode[0].runner.switches > 10
    assert summarize(0.1, results, SLO(ttft_s=1.0, tbt_s=0.05 * alpha * 1.2)).attainment > 0.9


def test_the_simulation_is_deterministic_and_bad_settings_are_refused():
    spec = [(0.01 * i, "ab"[i % 2], 10 + i) for i in range(20)]
    first = [r.token_times for r in simulate("aegaeon", spec)[1]]
    again = [r.token_times for r in simulate("aegaeon", spec)[1]]
    assert first == again
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        SimConfig("fifo", 1, 1, 0.1)
    with pytest.raises(ValueError, match="static needs"):
        Simulation(SimConfig("static", 1, 1, 0.1), TIMINGS, ["a", "b"])


def test_tokenpool_sim_writes_a_sweep_per_policy(tmp_path):
    import json

    from tokenpool.cli.main import main

    out = tmp_path / "sim.json"
    assert main(["sim", "--profile", "h800", "--models", "2,4", "--duration", "20", "--prefill", "1",
                 "--decode", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sweep"] == "models" and set(report["policies"]) == {"aegaeon", "request"}
    assert report["command"].startswith("tokenpool sim --profile h800 --models 2,4") and report["date"]
    for result in report["policies"].values():
        assert [p["load"] for p in result["points"]] == [2, 4] and "goodput" in result
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The sweep extended (aegaeon only, more models), then both drawn again as one curve per policy.
    more = tmp_path / "more.json"
    assert main(["sim", "--profile", "h800", "--models", "6", "--duration", "20", "--prefill", "1",
                 "--decode", "2", "--policies", "aegaeon", "--json", str(more), "--plot",
                 str(tmp_path / "more.png")]) == 0
    both = tmp_path / "both.png"
    assert main(["sim", "--replot", str(out), "--replot", str(more), "--plot", str(both)]) == 0
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_refuses_reports_it_cannot_draw_together_and_draws_nothing(tmp_path, capsys):
    import json

    from tokenpool.cli.main import main

    def report(path, rate=0.1, loads=(2, 4)):
        points = [{"load": n, "attainment": 1.0} for n in loads]
        path.write_text(json.dumps({"sweep": "models", "profile": "H800", "rate_per_model": rate,
                                    "slo": {"ttft_s": 10, "tbt_s": 0.1},
                                    "policies": {"aegaeon": {"goodput": 4, "points": points}}}))
        return str(path)

    a, plot = report(tmp_path / "a.json"), tmp_path / "x.png"
    for other, needle in ((report(tmp_path / "b.json", rate=0.5), "another setting than"),
                          (report(tmp_path / "c.json", loads=(4, 8)), "aegaeon at 4 models is in an earlier"),
                          (str(tmp_path / "absent.json"), "No such file")):
        assert main(["sim", "--replot", a, "--replot", other, "--plot", str(plot)]) == 2
        assert needle in capsys.readouterr().err and not plot.exists()
    (tmp_path / "d.json").write_text('{"sweep": "models"}')
    assert main(["sim", "--replot", str(tmp_path / "d.json"), "--plot", str(plot)]) == 2
    assert "not a `tokenpool sim` report" in capsys.readouterr().err
    assert main(["sim", "--replot", a]) == 2
    assert "--replot needs --plot" in capsys.readouterr().err and not plot.exists()


def test_tokenpool_sim_refuses_an_unknown_profile(tmp_path, capsys):
    from tokenpool.cli.main import main

    assert main(["sim", "--profile", "v100", "--json", str(tmp_path / "x.json")]) == 2
    assert "available: a10, a100, h100, h20, h800" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_two_models_stay_in_the_two_slots_so_switching_back_copies_nothing():
    sim, reqs, _ = simulate("aegaeon", [(0.0, "a", 300), (0.0, "b", 300)])
    runner = sim.decode[0].runner
    assert runner.switches > 10
    # Two switches copy (the decode instance's first a and first b); every later one is free,
    # so the last token comes long before switches x SWITCH would allow.
    assert max(r.token_times[-1] for r in reqs) < 300 * 2 * 0.01 + 4 * SWITCH + 0.5


def test_a_batch_that_outgrows_the_kv_region_preempts_its_newest_and_recomputes_it():
    """As the engine's scheduler: sequences are admitted while their KV blocks fit; when the
    running ones outgrow the region, the most recently admitted is preempted and later computes
    its whole history again (a prefill of its length) before its next token."""
    from tokenpool.engine.step_time_model import KVSwapTime

    swap = KVSwapTime(block_size=16, block_bytes=1000, out_gbps=1e3, in_gbps=1e3)
    timings = InstanceTimings(PROFILES, TIMINGS.copy_gbps, kv_swap={"a": swap})
    spec = [(0.0, "a", 40), (0.0, "a", 40), (0.0, "a", 40)]  # 16-token prompts: 2 blocks each at first

    def run(kv_bytes):
        sim = Simulation(SimConfig("aegaeon", 1, 1, 0.05, 0.5, decode_kv_bytes=kv_bytes), timings, ["a"])
        reqs = requests(spec)
        results = sim.run(reqs)
        assert all(r.finished for r in results) and all(len(r.token_times) == 40 for r in reqs)
        return sim.decode[0].runner, reqs

    unlimited, free = run(None)
    assert unlimited.preemptions == 0
    # 6 blocks: all three start (2 + 2 + 2); past 16 tokens they need 3 each, so the third is
    # preempted, and past 32 the second; each comes back once there is room, recomputing.
    limited, tight = run(6 * 1000)
    assert limited.preemptions >= 2 and limited.kv_blocks == {"a": 6}
    assert max(r.token_times[-1] for r in tight) > max(r.token_times[-1] for r in free)
    third = tight[2].token_times
    gaps = [b - a for a, b in zip(third, third[1:], strict=False)]
    assert max(gaps) >= 0.05  # waited, then a 0.05 s recompute
    assert tight[0].token_times[-1] == pytest.approx(free[0].token_times[-1], abs=0.2)  # the oldest runs on


def test_a_full_host_pool_refuses_hand_offs_and_keeps_the_active_model_on_the_device():
    """The host KV pool holds handed-over sequences until they join a batch, and the batches
    switched away from. A hand-off it has no room for fails; a switch away whose batch it has
    no room for is refused, so the active model runs on (as the live worker does)."""
    from tokenpool.engine.step_time_model import KVSwapTime

    swap = KVSwapTime(block_size=16, block_bytes=1 << 20, out_gbps=1e3, in_gbps=1e3)  # 4 blocks a slab
    timings = InstanceTimings(PROFILES, TIMINGS.copy_gbps, kv_swap={"a": swap, "b": swap})

    def run(spec, pool_slabs):
        config = SimConfig("aegaeon", 1, 1, 0.05, 0.5, decode_host_kv_bytes=pool_slabs * (4 << 20))
        sim = Simulation(config, timings, ["a", "b"])
        reqs = requests(spec)
        return sim.decode[0].runner, reqs, sim.run(reqs)

    # a's 40-token sequence (4 blocks when it is switched away from) and b's, interleaved: a
    # 1-slab pool holds a's batch, so the turns alternate; with no slab, b's hand-off is refused.
    spec = [(0.0, "a", 40), (0.0, "b", 40)]
    runner, reqs, results = run(spec, 1)
    assert all(r.finished for r in results) and runner.failed_switches == 0 and runner.refused == 0
    assert reqs[1].token_times[1] < reqs[0].token_times[-1]  # b ran while a had tokens to go
    runner, reqs, results = run(spec, 0)
    assert runner.refused == 2 and not any(r.finished for r in results)
    # Two sequences of a (2 blocks each at first, 3 past 32 tokens) against one slab of which
    # b's staged prompt takes 1: the switch to b is refused until a's batch has finished, so
    # b's second token comes after a's last.
    runner, reqs, results = run([(0.0, "a", 40), (0.0, "a", 40), (0.05, "b", 40)], 1)
    assert all(r.finished for r in results)
    assert runner.failed_switches > 0
    assert reqs[2].token_times[1] > min(reqs[0].token_times[-1], reqs[1].token_times[-1])
