"""Sequence: the one request object that flows through scheduler, runner and sampler."""

from __future__ import annotations

import enum
import itertools
import secrets
from dataclasses import dataclass, field

from .sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens or the model's context
    STOP = "stop"  # EOS, a stop token id or a stop string
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """A request's tokens and progress.

    token_ids holds prompt then output. num_computed_tokens counts tokens whose KV
    is in the cache; a decode instance receiving transferred KV starts with
    num_computed_tokens = num_prompt_tokens. After preemption it drops to 0 and
    the whole history is recomputed.
    """

    prompt_token_ids: list[int]
    sampling: SamplingParams
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    seed: int = field(init=False)  # the sampling seed, drawn at random when none was given

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)
        given = self.sampling.seed
        self.seed = given if given is not None else secrets.randbits(63)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
