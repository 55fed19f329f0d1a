"""LocalBackend: the engine thread behind the server, without gRPC."""

from __future__ import annotations

import asyncio

from tokenpool.engine.host_kv_pool import HostKVPool
from tokenpool.engine.host_model_cache import HostModelCache
from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.proxy.backend import Submission
from tokenpool.proxy.local_backend import LocalBackend

PROMPT = "A longer prompt that spans more than one block of sixteen tokens in the paged cache."


async def collect(backend: LocalBackend, model: str, ids: list[int], sampling) -> list[int]:
    sub = Submission(f"{model}-{len(ids)}", model, ids, sampling)
    await backend.submit(sub)
    tokens = []
    while (item := await sub.outputs.get()) is not None:
        assert not isinstance(item, Exception), item
        tokens += item.new_token_ids
    return tokens


def test_a_host_kv_pool_too_small_for_a_switch_delays_instead_of_failing(tiny_dir, tmp_path):
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    expected, prompts = {}, {}
    for name in ("tiny-llama", "tiny-qwen2"):
        engine = LLMEngine(tiny_dir / name, EngineConfig(dtype="float32", linear_kernel="dense"))
        prompts[name] = engine.tokenizer.encode(PROMPT)
        expected[name] = engine.generate([prompts[name]], sampling)[0].output_token_ids
    block = 3 * 2 * 16 * 2 * 16 * 4  # one tiny-llama KV block: the pool holds two, a request needs four
    pool = HostKVPool(2 * block, slab_bytes=2 * block, shm_dir=tmp_path)
    engine = MultiModelEngine(InstanceConfig(kv_bytes=1 << 20, slot_bytes=8 << 20,
                                             engine=EngineConfig(dtype="float32")),
                              HostModelCache(tmp_path / "cache", progress=False), pool)
    for name in expected:
        engine.register(name, tiny_dir / name)
    backend = LocalBackend(engine)

    async def both():
        return await asyncio.gather(*(collect(backend, n, prompts[n], sampling) for n in expected))

    try:
        results = asyncio.run(both())
    finally:
        asyncio.run(backend.close())
        engine.close()
        pool.close()
    assert dict(zip(expected, results, strict=True)) == expected
