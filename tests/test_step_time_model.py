"""Step-time and prefill-time fits, and the on-disk profile cache (pure logic, no engine)."""

import logging
import stat

import numpy as np
import pytest
from tokenpool.engine.step_time_model import (
    PrefillTimeModel,
    ProfileCache,
    StepTimeModel,
    TimingProfile,
)


def _step_samples(a, b, c, noise=0.0, n=40, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        batch = int(rng.integers(1, 33))
        seq = int(batch * rng.integers(16, 1024))
        t = a + b * seq + c * batch
        samples.append((seq, batch, t * (1 + noise * rng.standard_normal())))
    return samples


def test_step_fit_recovers_exact_coefficients():
    m = StepTimeModel.fit(_step_samples(0.01, 2e-6, 3e-4))
    assert m.a == pytest.approx(0.01, rel=1e-6)
    assert m.b == pytest.approx(2e-6, rel=1e-6)
    assert m.c == pytest.approx(3e-4, rel=1e-6)
    assert m.predict(1000, 4) == pytest.approx(0.01 + 2e-3 + 1.2e-3, rel=1e-6)


def test_step_fit_weighs_short_steps_by_relative_error():
    # Steps that grow less than linearly with the batch (as on a CPU): a one-sequence step must
    # not be predicted 40% long because the eight-sequence steps' absolute errors dominate.
    samples = [(17, 1, 0.068), (129, 1, 0.069), (130, 2, 0.099), (260, 4, 0.158), (136, 8, 0.170),
               (1032, 8, 0.189)] * 3
    m = StepTimeModel.fit(samples)
    for seq, batch, seconds in samples:
        assert m.predict(seq, batch) == pytest.approx(seconds, rel=0.10 if batch == 1 else 0.25)


def test_step_fit_with_noise_is_close():
    m = StepTimeModel.fit(_step_samples(0.01, 2e-6, 3e-4, noise=0.01, n=400))
    assert m.a == pytest.approx(0.01, rel=0.1)
    assert m.b == pytest.approx(2e-6, rel=0.1)
    assert m.c == pytest.approx(3e-4, rel=0.15)


def test_step_fit_clamps_negative_term_and_refits():
    # Time falls with batch size: unconstrained least squares gives c < 0.
    samples = [
        (seq, batch, 0.05 + 1e-4 * seq - 0.002 * batch) for seq in (100, 400, 900) for batch in (1, 4, 8)
    ]
    design = np.array([[1, s, b] for s, b, _ in samples], float)
    times = np.array([t for *_, t in samples])
    free = np.linalg.lstsq(design, times, rcond=None)[0]
    assert free[2] < 0  # the test really exercises the clamp
    m = StepTimeModel.fit(samples)
    assert min(m.a, m.b, m.c) >= 0
    assert m.c == 0.0
    assert m.b == pytest.approx(1e-4, rel=0.05)

    def sse(coef):  # what the fit minimises: the squared relative error
        return float(np.sum(((design @ coef - times) / times) ** 2))

    # Refitted without c, not just clipped: strictly better than zeroing c in the free fit.
    assert sse(np.array([m.a, m.b, m.c])) < sse(np.array([free[0], free[1], 0.0])) * 0.5


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([(1, 1, 0.1), (2, 1, 0.2)], "at least 3"),
        ([(1, 1, 0.1), (2, 1, 0.0), (3, 2, 0.3)], "seconds must be > 0"),
        ([(1, 1, 0.1), (2, 1, -0.2), (3, 2, 0.3)], "seconds must be > 0"),
        ([(1, 1, 0.1), (-2, 1, 0.2), (3, 2, 0.3)], "sum_seq_len must be >= 0"),
        ([(1, 1, 0.1), (2, -1, 0.2), (3, 2, 0.3)], "batch_size must be >= 0"),
    ],
)
def test_step_fit_rejects_bad_samples(samples, match):
    with pytest.raises(ValueError, match=match):
        StepTimeModel.fit(samples)


def test_prefill_fit_exact_and_rules():
    m = PrefillTimeModel.fit([(n, 0.02 + 5e-5 * n) for n in (16, 128, 512, 2048)])
    assert m.a == pytest.approx(0.02, rel=1e-6)
    assert m.b == pytest.approx(5e-5, rel=1e-6)
    assert m.predict(1000) == pytest.approx(0.07, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        PrefillTimeModel.fit([(16, 0.1)])
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        PrefillTimeModel.fit([(16, 0.1), (-1, 0.2)])
    with pytest.raises(ValueError, match="seconds must be > 0"):
        PrefillTimeModel.fit([(16, 0.1), (32, float("nan"))])


def test_prefill_fit_clamps_negative_intercept():
    m = PrefillTimeModel.fit([(100, 0.1), (200, 0.25), (300, 0.4)])  # free fit: a = -0.05
    assert m.a == 0.0
    assert m.b > 0


def _profile():
    return TimingProfile(StepTimeModel(0.01, 2e-6, 3e-4), PrefillTimeModel(0.02, 5e-5), weight_bytes=123456)


def test_cache_round_trip_and_permissions(tmp_path):
    root = tmp_path / "profiles"
    cache = ProfileCache(root)
    key = ProfileCache.key(arch="llama", layers=2, hidden=64, dtype="float32", threads=2, device="cpu")
    assert cache.get(key) is None
    cache.put(key, _profile())
    assert cache.get(key) == _profile()
    assert stat.S_IMODE((root / f"{key}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert [p.name for p in root.iterdir()] == [f"{key}.json"]  # no temp file left behind


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPOOL_PROFILES", str(tmp_path / "env"))
    cache = ProfileCache()
    cache.put("k1", _profile())
    assert (tmp_path / "env" / "k1.json").exists()


@pytest.mark.parametrize("content", [b"{not json", b'{"decode": 1}', b""])
def test_cache_corrupt_file_reads_as_missing(tmp_path, caplog, content):
    cache = ProfileCache(tmp_path)
    (tmp_path / "bad.json").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert cache.get("bad") is None
    assert "corrupt" in caplog.text


def test_cache_rejects_path_like_key(tmp_path):
    with pytest.raises(ValueError, match="profile key"):
        ProfileCache(tmp_path).get("../escape")


def test_key_is_stable_and_distinguishes_parts():
    parts = dict(arch="llama", layers=2, hidden=64, dtype="float32", threads=2, device="cpu")
    key = ProfileCache.key(**parts)
    assert key == ProfileCache.key(**dict(reversed(list(parts.items()))))
    assert key.isalnum() and len(key) >= 16
    assert key != ProfileCache.key(**{**parts, "threads": 4})
    assert key != ProfileCache.key(**{**parts, "layers": "2"})
    assert key != ProfileCache.key(**parts, extra=None)
