"""LLMEngine: one model, continuous batching, token streams out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .block_manager import BlockManager
from .compute_dtype import CHOICES as COMPUTE_CHOICES
from .compute_dtype import resolve_compute_dtype
from .kv_cache import PagedKVCache
from .model_backend import ENGINES, BackendSpec, ModelBackend, kv_layout_for, make_model_backend
from .model_config import ModelConfig
from .request_book import RequestBook, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence
from .tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """How an engine instance runs one model.

    dtype: 'auto' (the checkpoint's), float32, bfloat16 or float16.
    compute_dtype: 'auto' computes a bf16/fp16 model in its own dtype where the CPU has
      native instructions for it (AVX512-BF16, AMX) and in float32 from the dtype-rounded
      weights where it has not; 'native' and 'float32' force one path (compute_dtype.py).
      describe() says what it chose.
    kv_cache_bytes: memory for the paged KV cache (its block count is derived).
    max_model_len: context limit; None takes the model's max_position_embeddings.
    linear_kernel: 'auto', 'dense', 'onednn' or 'bf16_gemv' (bf16 weights computed in float32).
    attention_backend: 'auto', 'sdpa' or 'cpu_paged'.
    num_threads: torch intra-op threads; None leaves torch's default.
    engine: which model backend computes: 'native' (tokenpool's model code and kernels, the
      CPU default) or 'vllm' (vLLM's model classes and attention kernels; the tokenpool[vllm]
      extra, see engine/vllm_backend/).
    """

    dtype: str = "auto"
    compute_dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    max_model_len: int | None = None
    linear_kernel: str = "auto"
    attention_backend: str = "auto"
    num_threads: int | None = None
    engine: str = "native"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.compute_dtype not in COMPUTE_CHOICES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_CHOICES)}, "
                             f"got {self.compute_dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        kind = self.device.partition(":")[0]
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this torch build sees no CUDA device")


def resolve_dtypes(config: EngineConfig, model_config: ModelConfig) -> tuple[torch.dtype, torch.dtype]:
    """-> (weight dtype, compute dtype) as the config asks and this machine allows."""
    name = model_config.torch_dtype if config.dtype == "auto" else config.dtype
    dtype = _DTYPES.get(name, torch.float32)
    return dtype, resolve_compute_dtype(dtype, config.compute_dtype, config.device)


class LLMEngine(RequestBook):
    """One model, loaded from its folder, with its own KV cache: the single-model engine."""

    def __init__(self, folder: Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.folder = Path(folder)
        # Where start-up time goes (the switch benchmark reports it as the naive cost).
        self.startup_seconds: dict[str, float] = {}
        mark = time.perf_counter()
        self.model_config = ModelConfig.from_folder(self.folder)
        self.tokenizer = Tokenizer.from_folder(self.folder)
        self.dtype, self.compute_dtype = resolve_dtypes(config, self.model_config)
        self.max_model_len = min(config.max_model_len or 1 << 62,
                                 self.model_config.max_position_embeddings)
        mark = self._phase("config_and_tokenizer", mark)
        self.runner = self._load_model()
        self.model = self.runner.model  # the backend's module (CausalLM on the native engine)
        mark = self._phase("weights_read_and_pack", mark)
        block_bytes = PagedKVCache.bytes_per_block(self.model_config, config.block_size,
                                                   self.compute_dtype)
        num_blocks = max(1, config.kv_cache_bytes // block_bytes)
        self.kv_cache = PagedKVCache(self.model_config, num_blocks, config.block_size,
                                     self.compute_dtype, config.device,
                                     layout=kv_layout_for(config.engine, config.device))
        mark = self._phase("kv_allocation", mark)
        self.runner.bind_kv(self.kv_cache)
        self._phase("attention_backend", mark)
        super().__init__(self.model_config, self.tokenizer, self.max_model_len,
                         Scheduler(config.scheduler, BlockManager(num_blocks, config.block_size)))

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.startup_seconds[name] = now - since
        return now

    def _load_model(self) -> ModelBackend:
        c = self.config
        backend = make_model_backend(c.engine, BackendSpec(
            self.folder, self.model_config, self.compute_dtype, self.max_model_len, c.device,
            c.block_size, c.linear_kernel, c.attention_backend))
        # Computing wider than the weights: round them as the weight dtype would.
        backend.load(self.folder, self.dtype if self.compute_dtype != self.dtype else None)
        self.linear_kernel = getattr(backend, "linear_kernel", c.linear_kernel)
        return backend

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            if self.scheduler.has_work:
                raise MemoryError("the KV cache cannot hold even one waiting sequence; "
                                  "raise kv_cache_bytes or lower max_model_len")
            return []
        return self.apply(plan, self.runner.execute(plan))

    # -- conveniences ---------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], sampling: SamplingParams | None = None,
                 chat: bool = False) -> list[Sequence]:
        """Run prompts to completion together; returns their finished sequences in order."""
        seqs = [self.add_request(p, sampling, chat=chat) for p in prompts]
        while self.has_unfinished:
            self.step()
        return seqs

    def stream(self, prompt: str | list[int], sampling: SamplingParams | None = None,
               chat: bool = False) -> Iterator[RequestOutput]:
        seq = self.add_request(prompt, sampling, chat=chat)
        while not seq.is_finished:
            for out in self.step():
                if out.request_id == seq.request_id:
                    yield out

    def describe(self) -> str:
        c = self.model_config
        compute = str(self.compute_dtype).removeprefix("torch.")
        return (f"{self.folder.name}: {c.architecture}, {c.num_layers} layers, hidden "
                f"{c.hidden_size}, dtype {str(self.dtype).removeprefix('torch.')} (compute "
                f"{compute}), {self.runner.describe()}, "
                f"{self.kv_cache.num_blocks} KV blocks, "
                f"{torch.get_num_threads()} threads, pid {os.getpid()}")
