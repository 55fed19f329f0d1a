"""ModelRunner: executes a StepPlan on the model and returns the sampled tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import AttentionBackend, AttentionMetadata, PrefillSpan, attend_mask
from .kv_cache import PagedKVCache
from .model import CausalLM
from .sampler import Sampler
from .scheduler import ScheduledChunk, StepPlan, StepResult


class ModelRunner:
    """Owns the model, its KV cache and attention backend; knows nothing of policy."""

    def __init__(self, model: CausalLM, kv_cache: PagedKVCache, backend: AttentionBackend) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = Sampler()
        self.block_size = kv_cache.block_size
        self.device = kv_cache.kv.device  # step inputs are built here, where the cache is

    @torch.inference_mode()
    def execute(self, plan: StepPlan, on_layer: Callable[[int], None] | None = None) -> StepResult:
        """on_layer(i): called once layer i has written the step's KV (see CausalLM.forward)."""
        # Decodes (one new token after cached context) first: the backend batches them.
        chunks = sorted(plan.chunks, key=lambda c: not self._is_decode(c))
        input_ids, positions, slots = self._flatten(chunks)
        meta = self._metadata(chunks, slots)
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend, on_layer)
        rows, seqs, end = [], [], 0
        for chunk in chunks:
            end += chunk.num_tokens
            if chunk.completes:
                rows.append(end - 1)
                seqs.append(chunk.seq)
        if not rows:
            return StepResult({})
        logits = self.model.logits(hidden[self._tensor(rows)])
        tokens = self.sampler.sample(logits, seqs)
        return StepResult({s.request_id: t for s, t in zip(seqs, tokens, strict=True)},
                          self.sampler.logprobs(logits, seqs, tokens))

    def _tensor(self, data: list) -> torch.Tensor:
        return torch.tensor(data, device=self.device)

    @staticmethod
    def _is_decode(chunk: ScheduledChunk) -> bool:
        return chunk.num_tokens == 1 and chunk.seq.num_computed_tokens > 0

    def _flatten(self, chunks: list[ScheduledChunk]):
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            span = range(start, start + chunk.num_tokens)
            ids.extend(seq.token_ids[start:start + chunk.num_tokens])
            positions.extend(span)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in span)
        return self._tensor(ids), self._tensor(positions), self._tensor(slots)

    def _metadata(self, chunks: list[ScheduledChunk], slots: torch.Tensor) -> AttentionMetadata:
        window = self.model.config.sliding_window
        decodes = [c for c in chunks if self._is_decode(c)]
        tables, mask, seq_lens = None, None, None
        if decodes:
            width = max(len(c.seq.block_table) for c in decodes)
            tables = self._tensor([c.seq.block_table + [0] * (width - len(c.seq.block_table))
                                   for c in decodes])
            q_pos = self._tensor([c.seq.num_computed_tokens for c in decodes])
            seq_lens = q_pos + 1
            mask = attend_mask(q_pos.view(-1, 1), width * self.block_size, window)
            mask = mask.view(len(decodes), 1, 1, -1)
        return AttentionMetadata(slots, len(decodes), tables, mask,
                                 tuple(self._prefill_spans(chunks[len(decodes):], len(decodes))),
                                 decode_seq_lens=seq_lens, sliding_window=window)

    def _prefill_spans(self, chunks: list[ScheduledChunk], start: int):
        window = self.model.config.sliding_window
        for chunk in chunks:
            ctx, n = chunk.seq.num_computed_tokens, chunk.num_tokens
            mask = None
            if ctx or (window is not None and window < n):
                q_pos = torch.arange(ctx, ctx + n, device=self.device)
                mask = attend_mask(q_pos, ctx + n, window).view(1, 1, n, ctx + n)
            yield PrefillSpan(start, start + n, ctx, self._tensor(chunk.seq.block_table), mask)
            start += n
