"""Conversions between the engine's values and protobuf messages, used by every servicer.

Protobuf stops at the edge: servicers call these, the core never sees generated code.
"""

from __future__ import annotations

from tokenpool.engine.errors import InvalidRequestError
from tokenpool.engine.multi_model_engine import MultiModelEngine
from tokenpool.engine.sampler import TokenLogprobs
from tokenpool.engine.sampling_params import SamplingParams
from tokenpool.engine.sequence import FinishReason
from tokenpool.engine.step_profiler import InstanceTimings

from .internal.v1 import instances_pb2 as ipb
from .v1 import inference_pb2 as pb

FINISH_TO_PB = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.STOP: pb.FINISH_REASON_STOP,
                FinishReason.ABORT: pb.FINISH_REASON_ABORT}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}  # FINISH_REASON_UNSPECIFIED: not finished
DEFAULT_MAX_TOKENS = 64


def sampling_from_pb(msg: pb.SamplingParams, max_context: int, seed_offset: int = 0) -> SamplingParams:
    """Defaults for unset fields; InvalidRequestError names the bad field. seed_offset: an internal
    request's (a re-dispatch's), never a client's."""
    max_tokens = msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens > max_context:
        raise InvalidRequestError(f"sampling.max_tokens={max_tokens} exceeds the model's context "
                                  f"of {max_context} tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids), stop=tuple(msg.stop), ignore_eos=msg.ignore_eos,
        seed_offset=seed_offset, logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        logit_bias=dict(msg.logit_bias),
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0)


def sampling_to_pb(sp: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(max_tokens=sp.max_tokens, temperature=sp.temperature, top_k=sp.top_k,
                            top_p=sp.top_p, stop_token_ids=sp.stop_token_ids, stop=sp.stop,
                            ignore_eos=sp.ignore_eos)
    if sp.seed is not None:
        msg.seed = sp.seed
    if sp.logprobs is not None:
        msg.logprobs = sp.logprobs
    if sp.presence_penalty:
        msg.presence_penalty = sp.presence_penalty
    if sp.frequency_penalty:
        msg.frequency_penalty = sp.frequency_penalty
    msg.logit_bias.update(dict(sp.logit_bias))
    if sp.repetition_penalty != 1.0:
        msg.repetition_penalty = sp.repetition_penalty
    return msg


def logprobs_to_pb(values) -> list[pb.TokenLogprobs]:
    """engine.sampler.TokenLogprobs values -> their messages."""
    return [pb.TokenLogprobs(logprob=v.logprob,
                             top=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in v.top])
            for v in values]


def logprobs_from_pb(messages) -> tuple[TokenLogprobs, ...]:
    return tuple(TokenLogprobs(m.logprob, tuple((c.token_id, c.logprob) for c in m.top)) for m in messages)


def instance_status(engine: MultiModelEngine, name: str, role: str, queued: int, policy: str = "",
                    timings: InstanceTimings | None = None) -> ipb.InstanceStatus:
    """An InstanceStatus of the engine's current state; call it on the engine's own thread."""
    running = sum(len(m.book.scheduler.running) for m in engine.models.values())
    status = ipb.InstanceStatus(
        name=name, role=role, active_model=engine.active or "", models=sorted(engine.models),
        queued=queued, running=running, kv_blocks_used=engine.kv_blocks_used,
        host_kv_used_bytes=engine.pool.stats().used_bytes, switches=engine.switches, policy=policy,
        requests_by_model={m: n for m in engine.models if (n := engine.num_requests(m))},
        host_cached=sorted(m for m in engine.models if engine.cache.contains(m)), kv_usage=_kv_usage(engine))
    if engine.tiers is not None:  # disk loads in progress, and those done
        status.loads.extend(ipb.ModelLoad(model=p.model_id, loaded_bytes=p.loaded_bytes,
                                          total_bytes=p.total_bytes, waiting_for_room=p.waiting_for_room)
                            for p in engine.tiers.progress())
        status.cold_loads = engine.tiers.loader.completed
    for model, t in sorted(timings.profiles.items() if timings else ()):
        status.timings.add(model=model, prefill_a=t.prefill.a, prefill_b=t.prefill.b, step_a=t.decode.a,
                           step_b=t.decode.b, step_c=t.decode.c, switch_s=timings.switch_seconds(model))
    return status


def _kv_usage(engine: MultiModelEngine) -> float:
    """Fraction of the active model's device KV blocks in use (0 with no active model)."""
    if engine.active is None:
        return 0.0
    return engine.kv_blocks_used / engine.models[engine.active].book.scheduler.blocks.num_blocks
