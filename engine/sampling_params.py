"""SamplingParams: how one request picks its tokens and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequestError

MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit on logit_bias entries
MAX_LOGIT_BIAS = 100.0  # each bias lies in [-100, 100] (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0  # repetition_penalty lies in (0, 10]; 1 is none


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping; validated at construction.

    temperature 0 means greedy. A seed makes sampling reproducible whatever the
    batch the request shares. EOS from the model's config always stops unless
    ignore_eos is set (benchmarks use it to fix the output length).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    # Tokens this request generated before it was dispatched again (now part of its prompt):
    # per-token seeded draws continue from this index, so a resumed stream is the undisturbed one.
    seed_offset: int = 0
    # Report each sampled token's log-probability and the `logprobs` most likely (0-20); None: none.
    logprobs: int | None = None
    # OpenAI's penalties on the tokens generated so far (sampler.py): each token's logit loses
    # presence_penalty if it was generated at all and frequency_penalty for every time it was.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: (token id, bias) pairs added to those tokens' logits before each pick
    # (a dict is accepted too); at most MAX_LOGIT_BIAS_TOKENS of them, each in [-100, 100].
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's (and transformers') repetition_penalty over the prompt's and the generated tokens:
    # their positive logits are divided by it, their negative ones multiplied. 1: none.
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((t, b) for t, b in bias)))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed_offset, int) or self.seed_offset < 0:
            raise InvalidRequestError(f"seed_offset must be an integer >= 0, got {self.seed_offset!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                      f"got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # False for NaN too
                raise InvalidRequestError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], "
                                          f"got {value!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self._check_logit_bias()
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                                      f"got {self.repetition_penalty!r}")

    def _check_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise InvalidRequestError(f"logit_bias has {len(self.logit_bias)} tokens; the limit is "
                                      f"{MAX_LOGIT_BIAS_TOKENS}")
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # False for NaN too
                raise InvalidRequestError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, "
                                          f"{MAX_LOGIT_BIAS:g}], got {bias!r} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the sampler changes this request's logits before picking (sampler._adjusted)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)
