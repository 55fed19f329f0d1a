"""RequestBook: one model's requests — validation, queueing, and turning sampled
tokens into text deltas and finish decisions. Engines add the model and the runner."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequestError
from .model_config import ModelConfig
from .sampling_params import SamplingParams
from .scheduler import Scheduler, StepPlan, StepResult
from .sequence import FinishReason, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text: str  # the text delta
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: tuple = ()  # sampler.TokenLogprobs per new token, when the request asked for them


class RequestBook:
    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer, max_model_len: int,
                 scheduler: Scheduler) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._seqs: dict[str, Sequence] = {}

    # -- requests -------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, chat: bool = False) -> Sequence:
        """Queue a prompt (text, or token ids); raises InvalidRequestError if it cannot fit."""
        sampling = sampling or SamplingParams()
        ids = self._encode(prompt, chat)
        self.check_prompt(ids)
        self.check_sampling(sampling)
        seq = Sequence(ids, sampling, **({"request_id": request_id} if request_id else {}))
        if seq.request_id in self._seqs:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self._seqs[seq.request_id] = seq
        self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        self.scheduler.add(seq)
        return seq

    def adopt(self, prompt_ids: list[int], first_token: int, sampling: SamplingParams, seed: int,
              request_id: str) -> Sequence:
        """A sequence prefilled elsewhere: its prompt's KV exists and its first token was sampled.

        It starts with num_computed_tokens = prompt length, and its detokenizer has already
        emitted the first token's text (the prefill instance sent that delta). The caller puts
        it into the scheduler once its KV is in place. Raises InvalidRequestError like add_request.
        """
        self.check_prompt(prompt_ids)
        self.check_sampling(sampling)
        self._check_in_vocabulary([first_token], "first")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(prompt_ids, sampling, request_id=request_id)
        seq.seed = seed
        seq.token_ids.append(first_token)
        seq.num_computed_tokens = len(prompt_ids)
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        detok.add(first_token)
        detok.delta(final=False)  # already streamed by the prefill instance
        self._seqs[request_id], self._detok[request_id] = seq, detok
        return seq

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate")
        self._check_in_vocabulary(ids, "prompt")

    def check_sampling(self, sampling: SamplingParams) -> None:
        self._check_in_vocabulary([t for t, _ in sampling.logit_bias], "logit_bias")

    def _check_in_vocabulary(self, ids: list[int], what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(f"{what} token id {bad[0]} is outside the vocabulary "
                                      f"[0, {self.model_config.vocab_size})")

    def _encode(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
            seq.finish(FinishReason.ABORT)
            self._detok.pop(request_id, None)

    def get(self, request_id: str) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._seqs.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def apply(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        outputs = []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            token = result.sampled.get(seq.request_id)
            if token is not None:
                outputs.append(self._append_token(seq, token, result.logprobs.get(seq.request_id)))
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprobs=None) -> RequestOutput:
        seq.token_ids.append(token)
        detok = self._detok[seq.request_id]
        stop_string = detok.add(token)
        reason = self._finish_reason(seq, token, stop_string)
        if reason is not None:
            seq.finish(reason)
            self.scheduler.finish(seq)
            del self._seqs[seq.request_id], self._detok[seq.request_id]
        return RequestOutput(seq.request_id, [token], detok.delta(final=reason is not None),
                             reason is not None, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, (logprobs,) if logprobs is not None else ())

    def _finish_reason(self, seq: Sequence, token: int, stop_string: str | None):
        sp = seq.sampling
        eos = () if sp.ignore_eos else self.model_config.eos_token_ids
        if stop_string is not None or token in sp.stop_token_ids or token in eos:
            return FinishReason.STOP
        if seq.num_output_tokens >= sp.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
