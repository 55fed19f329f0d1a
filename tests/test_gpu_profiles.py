"""The shipped GPU profiles load, fit sensibly, and a broken profile is refused by name."""

from __future__ import annotations

import json

import pytest
from tokenpool.bench import gpu_profiles


@pytest.mark.parametrize("gpu", ["h800", "h100", "h20", "a100", "a10"])
def test_every_shipped_profile_fits_every_model(gpu):
    profile = gpu_profiles.load(gpu)
    assert profile.models and set(profile.models) <= set(gpu_profiles.PARAMETERS)  # the A10 has only Qwen
    for model, timing in profile.models.items():
        one = timing.decode.predict(512, 1)
        assert 0 < one < timing.decode.predict(32 * 512, 32), model  # bigger batches cost more
        assert timing.prefill.predict(2048) > timing.prefill.predict(128) > 0
    assert profile.switch_seconds("qwen2_5_7b") == pytest.approx(15.2e9 / (profile.h2d_gbps * 1e9))


def test_the_h800_fit_follows_its_rows():
    data = json.loads((gpu_profiles.PROFILES_DIR / "h800.json").read_text())
    fit = gpu_profiles.load("h800").models["qwen2_5_7b"]
    rows = data["models"]["qwen2_5_7b"]
    errors = [abs(fit.decode.predict(r["batch"] * r["input_len"], r["batch"]) - r["decode_step_s"])
              / r["decode_step_s"] for r in rows]
    assert sorted(errors)[len(errors) // 2] < 0.25  # median relative error of the linear model


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.pop("models"), "missing field 'models'"),
    (lambda d: d["models"]["qwen2_5_7b"][3].pop("decode_step_s"), "qwen2_5_7b row 3 lacks decode_step_s"),
    (lambda d: d.update(gpu="TPU"), "GPU 'TPU'"),
    (lambda d: d["models"].update(gpt5=[]), "unknown model 'gpt5'"),
])
def test_a_broken_profile_is_refused_naming_the_problem(tmp_path, change, needle):
    data = json.loads((gpu_profiles.PROFILES_DIR / "h800.json").read_text())
    change(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(gpu_profiles.ProfileError, match=needle.replace("(", r"\(")):
        gpu_profiles.load(path)


def test_an_unknown_gpu_name_lists_the_available_ones():
    with pytest.raises(gpu_profiles.ProfileError, match="available: a10, a100, h100, h20, h800"):
        gpu_profiles.load("v100")
