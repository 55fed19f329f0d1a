"""`tokenpool bench serve`: argument checks, goodput per policy, all-or-nothing output, and one
short live run against a real stack."""

from __future__ import annotations

import json

import msgspec
import pytest
from stack_helpers import start_tiny_stack
from tokenpool.bench import serve_bench, serving_overhead, sim_validation
from tokenpool.bench.serve_bench import sim_request
from tokenpool.bench.workload import TraceRequest
from tokenpool.cli.main import main
from tokenpool.engine.step_profiler import InstanceTimings


def point(load, attainment):
    return {"load": load, "attainment": attainment, "ttft_p50": 0.1, "ttft_p99": 0.2, "tbt_p50": 0.01,
            "tbt_p99": 0.02}


def test_goodput_per_policy_and_a_policy_that_never_reaches_90_percent_gets_a_note():
    policies = {"aegaeon": {"points": [point(1, 0.99), point(2, 0.95), point(4, 0.5)]},
                "static": {"points": [point(1, 0.3), point(2, 0.2)]}}
    serve_bench._set_goodputs(policies)
    assert policies["aegaeon"]["goodput"] == 2 and "note" not in policies["aegaeon"]
    assert policies["static"]["goodput"] == 0 and "never reaches 90%" in policies["static"]["note"]


def test_a_sweep_where_no_policy_reaches_90_percent_is_an_error():
    with pytest.raises(ValueError, match="the sweep never reaches 90% attainment"):
        serve_bench._set_goodputs({"request": {"points": [point(1, 0.5)]}})


@pytest.mark.parametrize("flags, needle", [
    (["--rates", "1,x"], "--rates '1,x'"), (["--rates", "0,1"], "must be positive"),
    (["--policies", "aegaeon,fifo"], "--policies 'aegaeon,fifo'"), (["--stop-below", "2"], "--stop-below 2"),
    (["--tbt-ms", "0"], "--tbt-ms 0"), (["--models-sweep", "1,x"], "--models-sweep '1,x'"),
    (["--models-sweep", "2", "--rates", "1,2"], "runs at one per-model rate"),
    (["--models-sweep", "0,2", "--rates", "1"], "must be 1 to 4"),
    (["--models-sweep", "5", "--rates", "1"], "must be 1 to 4"),
    (["--address", "127.0.0.1:9", "--tbt-ms", "100", "--policies", "aegaeon,request"],
     "--policies must name"),
    (["--address", "127.0.0.1:9"], "--tbt-ms must state"),
    (["--address", "127.0.0.1:9", "--tbt-ms", "100", "--policies", "request"], "no stack answers there"),
])
def test_bad_arguments_name_the_value_and_write_nothing(tmp_path, capsys, flags, needle):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--json", str(out), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_a_profile_that_lacks_a_model_is_refused_before_any_stack_starts(tmp_path, tiny_dir, capsys):
    profile, out = tmp_path / "cpu.json", tmp_path / "serve.json"
    only = f"--model=tiny-qwen2={tiny_dir / 'tiny-qwen2'}"
    assert main(["profile", "--threads", "1", "--json", str(profile), only]) == 0
    timings = InstanceTimings.from_json(profile.read_bytes())
    assert list(timings.profiles) == ["tiny-qwen2"] and timings.copy_gbps > 0
    assert timings.profiles["tiny-qwen2"].decode.predict(16, 1) > 0
    models = [f"--model={m}={tiny_dir / m}" for m in ("tiny-llama", "tiny-qwen2")]
    assert main(["bench", "serve", "--json", str(out), "--sim-profile", str(profile), *models]) == 2
    assert "lacks tiny-llama" in capsys.readouterr().err and not out.exists()


def test_a_short_live_run_writes_json_and_a_plot_and_simulates_the_same_trace(tmp_path, tiny_dir,
                                                                             monkeypatch, capsys):
    out = tmp_path / "serve.json"
    models = [f"--model={m}={tiny_dir / m}" for m in ("tiny-llama", "tiny-qwen2")]
    raw, profile = tmp_path / "raw.jsonl", tmp_path / "cpu.json"
    for name, value in (("BATCHES", (1, 4)), ("CORUN_BATCHES", (1,)), ("REPEATS", 1)):
        monkeypatch.setattr(serving_overhead, name, value)  # a shorter measurement, same code
    assert main(["profile", "--threads", "1", "--live-clock", "--json", str(profile), *models]) == 0
    measured = json.loads(profile.read_text())["serving_measurement"]
    assert measured["model"] == "tiny-qwen2" and [s["batch"] for s in measured["steps"]] == [1, 4, 1]
    assert all(s["step_s"] > 0 and s["predicted_s"] > 0 for s in measured["steps"])
    measured_timings = InstanceTimings.from_json(profile.read_bytes())
    overhead = measured_timings.serving
    assert set(measured_timings.step_tables) == {"tiny-llama", "tiny-qwen2"}
    table = measured_timings.step_tables["tiny-llama"]
    assert table.batches == (1, 2, 3, 4, 6, 8) and all(s > 0 for s in table.seconds)
    swap = measured_timings.kv_swap["tiny-llama"]  # 3 layers x K,V x 2 heads x 16 dims x 4 bytes x 16
    assert swap.block_bytes == 3 * 2 * 2 * 16 * 4 * 16 and swap.out_gbps > 0 and swap.in_gbps > 0
    assert set(measured_timings.kv_swap) == {"tiny-llama", "tiny-qwen2"}
    assert main(["bench", "serve", "--json", str(out), "--policies", "aegaeon", "--rates", "0.5",
                 "--duration", "3", "--threads", "1", "--raw", str(raw), "--sim-profile", str(profile),
                 *models]) == 0
    report = json.loads(out.read_text())
    assert report["sweep"] == "rate_per_model" and set(report["policies"]) == {"aegaeon"}
    assert "not scored" in report["warmup"] and report["ended"] >= report["date"]
    err = capsys.readouterr().err  # each model answered its warm-up request before the first rate
    assert err.index("warm-up: tiny-llama answered 64 tokens") < err.index("warm-up: tiny-qwen2 answered") \
        < err.index("[aegaeon] rate 0.5/s per model")
    assert len(records := [json.loads(line) for line in raw.read_text().splitlines()]) == len(
        [r for r in records if not r["request_id"].startswith("warmup")])  # the warm-up is not in the raw
    result = report["policies"]["aegaeon"]
    assert result["goodput"] == 0.5 and result["points"][0]["attainment"] >= 0.9
    assert report["slo"]["ttft_s"] == pytest.approx(100 * report["slo"]["tbt_s"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    assert records and all(r["policy"] == "aegaeon" and r["rate"] == 0.5 for r in records)
    assert all(r["finished"] and r["token_times"][0] >= r["arrival_s"] for r in records)
    assert "_raw" not in report["policies"]["aegaeon"]
    simulated = result["simulated"]["points"]
    assert [p["load"] for p in simulated] == [0.5] and simulated[0]["attainment"] >= 0.9  # light load
    gap = abs(simulated[0]["attainment"] - result["points"][0]["attainment"]) * 100
    assert result["sim_gap_pp"] == pytest.approx(gap)
    assert report["sim_profile"]["file"] == str(profile)
    assert report["sim_profile"]["serving_overhead"] == msgspec.to_builtins(overhead)
    assert report["sim_profile"]["kv_swap"] == ["tiny-llama", "tiny-qwen2"]
    # The same report re-simulated (no live run): its traces regenerate from the command's seed,
    # so the same profile gives exactly the same simulated points, and the live ones are kept.
    again = tmp_path / "again.json"
    assert main(["bench", "serve", "--resimulate", str(out), "--sim-profile", str(profile),
                 "--json", str(again)]) == 0
    redone = json.loads(again.read_text())
    assert redone["policies"]["aegaeon"]["simulated"] == result["simulated"]
    assert redone["policies"]["aegaeon"]["points"] == result["points"]
    assert redone["resimulated"]["from"] == str(out) and again.with_suffix(".png").exists()
    # Two "runs" (the report and its re-simulation) against one profile: live and simulated
    # attainments per rate, and the gap between their means.
    validation = tmp_path / "validation.json"
    assert sim_validation.main(["--report", str(out), "--report", str(again), "--profile", str(profile),
                                "--json", str(validation)]) == 0
    written = json.loads(validation.read_text())
    assert written["command"].startswith("python -m tokenpool.bench.sim_validation --report ")
    (row,) = written["rows"]
    assert row["policy"] == "aegaeon" and row["load"] == 0.5 and len(row["live"]) == 2
    assert row["simulated"] == [simulated[0]["attainment"]] * 2
    assert row["gap_of_means_pp"] == pytest.approx(gap)


def test_resimulate_refuses_what_is_not_a_report_and_writes_nothing(tmp_path, capsys):
    bogus, out = tmp_path / "bogus.json", tmp_path / "out.json"
    bogus.write_text('{"policies": {}}')
    assert main(["bench", "serve", "--resimulate", str(bogus), "--sim-profile", str(bogus),
                 "--json", str(out)]) == 2
    assert "not a `tokenpool bench serve` report" in capsys.readouterr().err
    assert main(["bench", "serve", "--resimulate", str(bogus), "--json", str(out)]) == 2
    assert "--resimulate needs --sim-profile" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_the_simulator_judges_a_request_against_the_context_as_the_engine_does():
    request = TraceRequest(arrival_s=1.5, model="m", prompt="...", max_tokens=64, request_id="r1")
    assert sim_request(request, prompt_len=512, context=512) is None  # live refuses it: scores 0
    assert sim_request(request, prompt_len=600, context=512) is None
    cut = sim_request(request, prompt_len=500, context=512)
    assert (cut.prompt_tokens, cut.max_tokens, cut.arrival_s) == (500, 12, 1.5)  # stops at the context
    assert sim_request(request, prompt_len=100, context=512).max_tokens == 64


def test_a_baseline_runs_alone_with_a_stated_tbt(tmp_path, tiny_dir):
    # Without --tbt-ms the SLO comes from an aegaeon decode instance's own target; with it any
    # policy runs first (or alone), and every stack and the scoring use the stated value.
    out = tmp_path / "serve.json"
    models = [f"--model={m}={tiny_dir / m}" for m in ("tiny-llama", "tiny-qwen2")]
    assert main(["bench", "serve", "--json", str(out), "--policies", "request", "--rates", "0.5",
                 "--duration", "3", "--threads", "1", "--tbt-ms", "80", *models]) == 0
    report = json.loads(out.read_text())
    assert set(report["policies"]) == {"request"}
    assert report["slo"]["tbt_s"] == pytest.approx(0.08) and report["slo"]["ttft_s"] == pytest.approx(8.0)
    assert report["slo"]["how"].startswith("TBT = --tbt-ms")
    assert report["policies"]["request"]["points"][0]["attainment"] >= 0.9  # light load


def _dated(path, date: str, **more):
    path.write_text(json.dumps({"date": date, **more}))
    return path


def test_validation_pairs_each_report_with_the_profiles_measured_nearest_it(tmp_path):
    early = _dated(tmp_path / "early.json", "2026-11-28 10:00:00 UTC", ended="2026-11-28 10:20:00 UTC")
    late = _dated(tmp_path / "late.json", "2026-11-28 12:00:00 UTC")  # no end: taken at its start
    profiles = [_dated(tmp_path / f"p{hhmm}.json", f"2026-11-28 {hhmm[:2]}:{hhmm[2:]}:00 UTC")
                for hhmm in ("0955", "1025", "1130", "1158", "1300")]
    p0955, p1025, p1130, p1158, p1300 = profiles
    assert sim_validation.pair_by_time([early, late], profiles, 2) == {early: [p0955, p1025],
                                                                       late: [p1130, p1158]}
    assert sim_validation.pair_by_time([early], profiles, 0) == {early: profiles}
    with pytest.raises(SystemExit, match="only 5 profiles"):
        sim_validation.pair_by_time([early], profiles, 6)
    undated = tmp_path / "undated.json"
    undated.write_text("{}")
    with pytest.raises(SystemExit, match="no 'date' date"):
        sim_validation.pair_by_time([undated], profiles, 1)
    undated.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a JSON object"):
        sim_validation.pair_by_time([undated], profiles, 1)


def test_a_running_stack_is_driven_through_a_sweep_of_the_number_of_models(tmp_path, tiny_dir):
    # --address: no stack is started; the running one serves tiny-llama and tiny-qwen2 but not
    # tiny-qwen3, whose requests score 0. The sweep: the first 1, 2, 3 of the --model list get traffic.
    out = tmp_path / "models.json"
    models = [f"--model={m}={tiny_dir / m}" for m in ("tiny-llama", "tiny-qwen2", "tiny-qwen3")]
    with start_tiny_stack(tiny_dir, ["tiny-llama", "tiny-qwen2"], tmp_path / "logs") as stack:
        assert main(["bench", "serve", "--address", stack.address, "--policies", "aegaeon", "--tbt-ms", "200",
                     "--rates", "0.5", "--models-sweep", "3,1,2", "--duration", "6", "--stop-below", "0",
                     "--json", str(out), *models]) == 0
        unserved = f"--model=tiny-qwen3={tiny_dir / 'tiny-qwen3'}"
        assert main(["bench", "serve", "--address", stack.address, "--policies", "aegaeon", "--tbt-ms", "200",
                     "--json", str(tmp_path / "none.json"), unserved]) == 2
    report = json.loads(out.read_text())
    assert report["sweep"] == "models" and report["rate_per_model"] == 0.5
    result = report["policies"]["aegaeon"]
    assert result["served_models"] == ["tiny-llama", "tiny-qwen2"]
    (one, two, three) = result["points"]
    assert [one["load"], two["load"], three["load"]] == [1, 2, 3]
    assert one["attainment"] >= 0.9 and two["attainment"] >= 0.9 and result["goodput"] == 2
    assert three["attainment"] < 0.9  # a third of the requests (tiny-qwen3's) score 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "none.json").exists()


def test_a_short_live_run_over_the_http_gateway_scores_every_request(tmp_path, tiny_dir):
    out, raw = tmp_path / "http.json", tmp_path / "http.jsonl"
    assert main(["bench", "serve", "--json", str(out), "--raw", str(raw), "--policies", "aegaeon",
                 "--rates", "0.5", "--duration", "3", "--threads", "1", "--api", "http",
                 "--model", f"tiny-llama={tiny_dir / 'tiny-llama'}"]) == 0
    assert json.loads(out.read_text())["api"] == "http"
    requests = [json.loads(line) for line in raw.read_text().splitlines()]
    assert requests and all(r["finished"] and r["token_times"] for r in requests)
