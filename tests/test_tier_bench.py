"""`tokenpool bench tiers` runs end to end on a tiny model and reports every tier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenpool.bench import page_cache
from tokenpool.cli.main import main as cli


def test_the_tier_bench_measures_every_tier_and_the_naive_start(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tiers.json"
    # a copy no one else maps: other tests' engines and transformers models in this process keep
    # the shared tiny folders' pages mapped, and the kernel drops no mapped page
    model = Path(shutil.copytree(tiny_dir / "tiny-qwen3", tmp_path / "tiny-qwen3"))
    cli(["bench", "tiers", "--model", str(model), "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["first_token_s"]) == {"resident", "host cache", "disk, page cache warm",
                                            "disk, page cache dropped"}
    assert all(s > 0 for s in report["first_token_s"].values())
    assert set(report["naive_s"]) == {"warm", "dropped"}
    assert report["cold_load_gbps"]["dropped"] > 0 and report["sequential_read_gbps"]["dropped"] > 0
    # nothing keeps the checkpoint mapped between loads, so its pages can leave the page cache
    assert report["page_cache_left_after_drop"] == 0.0
    table = capsys.readouterr().out
    assert "disk, page cache dropped" in table and "naive / tier" in table


def test_a_drop_empties_the_page_cache_of_a_freshly_written_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\1" * (1 << 20))
    page_cache.sequential_read_gbps([f])
    assert page_cache.resident_fraction([f]) == 1.0
    page_cache.drop([f])
    assert page_cache.resident_fraction([f]) == 0.0
