"""The GPU setting of the simulator respects device memory: weights, the arena's two slots and
each sequence's KV are sized from the models' real shapes and the GPU's memory."""

from __future__ import annotations

import json

import pytest
from tokenpool.bench import gpu_profiles
from tokenpool.bench.simulator import SimConfig, SimRequest, Simulation

GIB = 2**30
LLAMA_BLOCK = 16 * 40 * 2 * 40 * 128 * 2  # 16 tokens x layers x (K, V) x kv_heads x head_dim x bf16


def test_kv_per_token_and_block_from_each_models_shape():
    assert gpu_profiles.kv_token_bytes("qwen2_5_7b") == 28 * 2 * 4 * 128 * 2 == 57344
    assert gpu_profiles.kv_token_bytes("yi1_5_9b_chat") == 48 * 2 * 4 * 128 * 2 == 98304
    assert gpu_profiles.kv_token_bytes("llama2_13b_chat") == 40 * 2 * 40 * 128 * 2 == 819200
    assert gpu_profiles.kv_block_bytes("llama2_13b_chat") == LLAMA_BLOCK == 13107200


def test_the_arena_is_memory_less_the_reserve_with_two_slots_of_the_largest_model():
    plan = gpu_profiles.plan_memory(["qwen2_5_7b", "yi1_5_9b_chat", "llama2_13b_chat"], 80)
    assert plan.largest == "llama2_13b_chat" and plan.slot_bytes == 26_000_000_000
    assert plan.arena_bytes == int(80 * GIB * 0.9)
    assert plan.kv_bytes == int(80 * GIB * 0.9) - 52_000_000_000  # about 23.6 GiB
    assert plan.kv_blocks("llama2_13b_chat") == plan.kv_bytes // LLAMA_BLOCK == 1930  # 30,880 tokens
    assert plan.kv_blocks("qwen2_5_7b") == plan.kv_bytes // (16 * 57344) == 27585
    small = gpu_profiles.plan_memory(["qwen2_5_7b"], 80)  # Qwen alone: slots of 15.2 GB, more KV
    assert small.slot_bytes == 15_200_000_000 and small.kv_bytes == int(80 * GIB * 0.9) - 30_400_000_000


@pytest.mark.parametrize(("gpu", "gib"), [("h800", 80), ("h100", 80), ("h20", 96), ("a100", 80), ("a10", 24)])
def test_each_gpu_profile_carries_its_memory(gpu, gib):
    assert gpu_profiles.load(gpu).memory_gib == gib


def test_two_slots_that_do_not_fit_are_refused_naming_the_numbers():
    with pytest.raises(gpu_profiles.DeviceMemoryError) as info:
        gpu_profiles.plan_memory(["qwen2_5_7b", "llama2_13b_chat"], 24)
    message = str(info.value)
    for needle in ("two model slots of llama2_13b_chat", "48.4 GiB", "2 x 24.2 GiB",
                   "24 GiB of device memory", "10%", "21.6 GiB", "--device-memory-gib"):
        assert needle in message


def test_tokenpool_sim_refuses_a10_and_a_too_small_device_before_simulating(tmp_path, capsys):
    from tokenpool.cli.main import main

    out = tmp_path / "x.json"
    # The A10 profile has Qwen2.5-7B only: two 15.2 GB slots exceed 90% of 24 GiB.
    assert main(["sim", "--profile", "a10", "--models", "8", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "two model slots of qwen2_5_7b (28.3 GiB" in err and "(21.6 GiB)" in err and not out.exists()
    assert main(["sim", "--profile", "h800", "--device-memory-gib", "50", "--models", "8",
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not fit in 50 GiB of device memory" in err and "45.0 GiB" in err and not out.exists()


def _tiny_region_run(kv_blocks: int | None):
    """One H800 decode instance serving Llama-2-13B with a KV region of kv_blocks blocks (None:
    the real 80 GiB) -> its runner and requests."""
    gpu = gpu_profiles.load("h800")
    llama = {"llama2_13b_chat"}
    if kv_blocks is None:
        plan = gpu_profiles.plan_memory(llama, 80)
    else:  # no reserve; room for the two slots and kv_blocks blocks, and half a block to spare
        plan = gpu_profiles.plan_memory(llama, (52_000_000_000 + (kv_blocks + 0.5) * LLAMA_BLOCK) / GIB, 0.0)
    timings = gpu_profiles.with_kv(gpu, llama).timings({"m": "llama2_13b_chat"})
    config = SimConfig("aegaeon", 1, 1, 0.1, decode_kv_bytes=plan.kv_bytes, decode_host_kv_bytes=64 * GIB,
                       host_slab_bytes=64 << 20)
    sim = Simulation(config, timings, ["m"])
    reqs = [SimRequest(f"r{i}", "m", 0.0, 16, 40) for i in range(3)]  # 2 blocks each at first, 3 past 32
    results = sim.run(reqs)
    assert all(r.finished for r in results)
    return sim.decode[0].runner, reqs


def test_a_decode_instance_with_a_tiny_kv_region_preempts_as_a_live_one():
    roomy, free = _tiny_region_run(None)
    assert roomy.preemptions == 0 and roomy.kv_blocks == {"m": 1930}
    tight, slow = _tiny_region_run(6)
    assert tight.kv_blocks == {"m": 6} and tight.preemptions >= 2
    assert max(r.token_times[-1] for r in slow) > max(r.token_times[-1] for r in free)
    # Llama-2-13B's KV moves over the host link: 17 tokens take 2 blocks, 0.5 ms at 50 GB/s
    assert timings_swap_in_s() == pytest.approx(2 * LLAMA_BLOCK / 50e9)


def timings_swap_in_s() -> float:
    gpu = gpu_profiles.with_kv(gpu_profiles.load("h800"), {"llama2_13b_chat"})
    return gpu.timings({"m": "llama2_13b_chat"}).kv_swap_seconds("m", 17, "in")


def test_tokenpool_sim_reports_the_arena_and_what_memory_did(tmp_path):
    """A one-model point on one H800 decode instance whose KV region holds 1/16 GiB: its batch
    outgrows it."""
    from tokenpool.cli.main import main

    out = tmp_path / "kv.json"
    memory = (30_400_000_000 + GIB / 16) / GIB  # Qwen's two slots, 1/16 GiB of KV (1,170 tokens); no reserve
    assert main(["sim", "--profile", "h800", "--models", "1", "--rate", "1.5", "--duration", "40",
                 "--prefill", "1", "--decode", "1",
                 "--policies", "aegaeon", "--device-memory-gib", f"{memory:.6f}", "--memory-reserve", "0",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    arena = report["memory"]["arena_by_largest_model"]["qwen2_5_7b"]
    assert arena["slot_gib"] == pytest.approx(15.2e9 / GIB, abs=1e-3)
    assert arena["kv_region_gib"] == pytest.approx(1 / 16, abs=1e-3)
    assert report["memory"]["kv_bytes_per_token"] == {"qwen2_5_7b": 57344}
    kv = report["policies"]["aegaeon"]["points"][0]["kv"]
    assert kv["largest_model"] == "qwen2_5_7b" and kv["preemptions"] > 0
    assert main(["sim", "--profile", "h800", "--models", "1", "--rate", "1.5", "--duration", "40",
                 "--policies", "aegaeon", "--no-kv-limits", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["memory"] is None and "kv" not in report["policies"]["aegaeon"]["points"][0]
