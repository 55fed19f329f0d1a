"""The engine's own scheduler: FIFO continuous batching inside one model.

It speaks the narrow seam every scheduler uses: a StepPlan out (which sequences,
how many new tokens each), a StepResult back (the tokens sampled).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # new tokens computed this step, from seq.num_computed_tokens on

    @property
    def completes(self) -> bool:
        """The chunk reaches the sequence's last token, so a token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True)
class StepResult:
    sampled: dict[str, int]  # request_id -> token, for chunks that complete their sequence
    logprobs: dict = field(default_factory=dict)  # request_id -> sampler.TokenLogprobs, where asked


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step.

    max_num_seqs: sequences running at once.
    max_num_batched_tokens: tokens per step; longer prompts are computed in chunks.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


class Scheduler:
    """Running sequences get their next token first; waiting prompts fill the rest.

    When KV blocks run out, the most recently admitted sequence is preempted: its
    blocks are freed and it waits to recompute its whole history.
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ready: Callable[[Sequence], bool] | None = None) -> StepPlan:
        """ready(seq) False leaves a running sequence out of this step (its KV is still
        being swapped in)."""
        budget = self.config.max_num_batched_tokens
        chunks = self._schedule_running(budget, ready)
        budget -= sum(c.num_tokens for c in chunks)
        chunks += self._admit_waiting(budget)
        return StepPlan(tuple(chunks))

    def _schedule_running(self, budget: int,
                          ready: Callable[[Sequence], bool] | None) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq not in self.running or (ready is not None and not ready(seq)):
                continue  # preempted to make room for an earlier one, or KV not landed yet
            n = min(seq.num_uncomputed_tokens, budget - sum(c.num_tokens for c in chunks))
            if n <= 0:
                break
            if not self._make_room(seq, seq.num_computed_tokens + n):
                continue
            chunks.append(ScheduledChunk(seq, n))
        return chunks

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_grow(seq, seq.num_computed_tokens + n):
                break
            self.blocks.grow(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks

    @property
    def has_room(self) -> bool:
        return len(self.running) < self.config.max_num_seqs

    def adopt(self, seq: Sequence) -> None:
        """Run a sequence whose KV the caller has put into its blocks (swapped in, handed over)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
