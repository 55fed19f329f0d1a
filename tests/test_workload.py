"""ShareGPT reading, Poisson workloads and the JSONL trace format."""

from __future__ import annotations

import json
import math

import pytest
from tokenpool.bench.sharegpt import Conversation, dataset_path, iter_conversations, load_pairs
from tokenpool.bench.workload import (
    TraceRequest,
    WorkloadConfig,
    make_trace,
    read_trace,
    scale_trace,
    write_trace,
)


def _words(text: str) -> int:
    return len(text.split())


def _record(i: int, first: str = "human", second: str = "gpt") -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": f"question {i} \u00e9\u4e2d"},
                                             {"from": second, "value": f"answer {i}"}]}


def _shipped_dataset():
    try:
        return dataset_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_shipped_dataset_parses_up_to_its_truncated_tail():
    path = _shipped_dataset()
    assert sum(1 for _ in iter_conversations(path)) == 17_671
    pairs = load_pairs(path)
    assert len(pairs) == 11_135
    assert pairs[0].id == "QWJhYvA_0" and pairs[0].prompt.startswith("Summarize the main ideas")
    assert load_pairs(path, limit=3) == pairs[:3]


@pytest.mark.parametrize("cut", [1, 7, 40])  # inside the last record, at several depths
def test_truncated_file_yields_exactly_the_complete_records(tmp_path, monkeypatch, cut):
    import tokenpool.bench.sharegpt as sharegpt

    monkeypatch.setattr(sharegpt, "_CHUNK_CHARS", 16)  # records straddle many chunks
    records = [_record(0), _record(1, second="human"), _record(2, first="gpt"), _record(3), _record(4)]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    last = text.rindex("{\n    \"id\": \"c4\"")
    path = tmp_path / "cut.json"
    path.write_text(text[: last + cut], encoding="utf-8")
    assert list(iter_conversations(path)) == records[:4]
    assert load_pairs(path) == [Conversation("c0", records[0]["conversations"][0]["value"], "answer 0"),
                                Conversation("c3", records[3]["conversations"][0]["value"], "answer 3")]


def test_complete_file_and_empty_array_read_whole(tmp_path):
    path = tmp_path / "whole.json"
    path.write_text(json.dumps([_record(0), _record(1)]), encoding="utf-8")
    assert [r["id"] for r in iter_conversations(path)] == ["c0", "c1"]
    path.write_text(" [ ] ", encoding="utf-8")
    assert list(iter_conversations(path)) == []


PAIRS = [Conversation(f"c{i}", " ".join(["w"] * (i + 1)), " ".join(["a"] * (3 * i))) for i in range(10)]


def _config(**overrides) -> WorkloadConfig:
    fields = dict(models=("m0", "m1", "m2"), rate_per_model=0.5, duration_s=200.0, seed=7)
    return WorkloadConfig(**{**fields, **overrides})


@pytest.mark.parametrize("field, value", [("models", ()), ("rate_per_model", 0.0), ("duration_s", -1.0),
                                          ("max_prompt_tokens", 0), ("max_output_tokens", 0)])
def test_workload_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"{field} must .*{value!r}"):
        _config(**{field: value})


def test_poisson_count_matches_rate_times_duration():
    trace = make_trace(_config(models=("m",), rate_per_model=2.0, duration_s=5000.0), PAIRS, _words)
    expected = 2.0 * 5000.0
    assert abs(len(trace) - expected) < 5 * math.sqrt(expected)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(trace, trace[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.05)
    assert trace[-1].arrival_s < 5000.0


def test_trace_is_sorted_merged_and_deterministic_by_seed():
    trace = make_trace(_config(), PAIRS, _words)
    assert [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    assert {r.model for r in trace} == {"m0", "m1", "m2"}
    assert len({r.request_id for r in trace}) == len(trace)
    assert make_trace(_config(), PAIRS, _words) == trace
    assert make_trace(_config(seed=8), PAIRS, _words) != trace


def test_long_prompts_are_redrawn_and_max_tokens_is_capped():
    trace = make_trace(_config(max_prompt_tokens=4, max_output_tokens=6), PAIRS, _words)
    by_prompt = {p.prompt: p for p in PAIRS}
    assert {_words(r.prompt) for r in trace} == {1, 2, 3, 4}  # every fitting pair drawn, no others
    for r in trace:
        assert r.max_tokens == max(1, min(_words(by_prompt[r.prompt].answer), 6))
    assert 1 in {r.max_tokens for r in trace}  # c0's empty answer still asks for one token
    with pytest.raises(ValueError, match="max_prompt_tokens=1"):
        make_trace(_config(max_prompt_tokens=1), PAIRS[1:], _words)


def test_trace_round_trips_through_jsonl(tmp_path):
    trace = make_trace(_config(duration_s=40.0), PAIRS, _words)
    trace.append(TraceRequest(trace[-1].arrival_s, "m0", 'quote " newline \n \u4e2d', 3, "extra"))
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace)
    assert read_trace(path) == trace
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(trace)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.jsonl"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "trace.jsonl"
    with pytest.raises(TypeError):
        write_trace(path, [TraceRequest(0.0, "m", "p", 1, "r0"), object()])
    assert list(tmp_path.iterdir()) == []


GOOD = '{"arrival_s": 1.0, "model": "m", "prompt": "p", "max_tokens": 4, "request_id": "r0"}'


def _line(**changes) -> str:
    fields = {"arrival_s": 2.0, "model": "m", "prompt": "p", "max_tokens": 4, "request_id": "r1"}
    return json.dumps({k: v for k, v in {**fields, **changes}.items() if v is not None})


@pytest.mark.parametrize("line, problem", [
    (_line()[:-1], "malformed|truncated"),
    (_line(request_id=None), "missing required field `request_id`"),
    (_line(arrival_s="soon"), "Expected `float`, got `str` - at `\\$.arrival_s`"),
    (_line(arrival_s=0.5), "arrival_s 0.5 is earlier than the previous line's 1.0"),
    (_line(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (_line(request_id="r0"), "request_id 'r0' repeats"),
])
def test_malformed_trace_lines_are_named(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*({problem})"):
        read_trace(path)


def test_negative_arrival_is_rejected_on_the_first_line(tmp_path):
    path = tmp_path / "neg.jsonl"
    path.write_text(GOOD.replace("1.0", "-1.0") + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"neg.jsonl:1: arrival_s must be a finite number >= 0, got -1.0"):
        read_trace(path)


def test_equal_arrival_times_are_allowed(tmp_path):
    path = tmp_path / "burst.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"r0"', '"r1"') + "\n", encoding="utf-8")
    assert [r.request_id for r in read_trace(path)] == ["r0", "r1"]


def test_scale_trace_reassigns_models_round_robin():
    trace = make_trace(_config(duration_s=20.0), PAIRS, _words)
    scaled = scale_trace(trace, ["a", "b"])
    assert [r.model for r in scaled] == ["a", "b"] * (len(trace) // 2) + ["a"] * (len(trace) % 2)
    assert [(r.arrival_s, r.prompt, r.request_id) for r in scaled] == [
        (r.arrival_s, r.prompt, r.request_id) for r in trace]
    with pytest.raises(ValueError, match="models must be non-empty"):
        scale_trace(trace, [])
