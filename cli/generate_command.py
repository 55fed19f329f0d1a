"""`tokenpool generate`: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.model_store import DEFAULT_MODEL
from tokenpool.engine.sampling_params import SamplingParams

from .models_command import ensure_model
from .server_security import add_client_security_args


def add_parser(commands) -> None:
    gen = commands.add_parser("generate", help="generate text from a prompt, streamed")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="folder or store name")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--compute-dtype", default="auto", choices=["auto", "native", "float32"],
                     help="a bf16/fp16 model's math: auto (native where the CPU has it, else float32)")
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--server", default=None, metavar="ADDR",
                     help="stream from a running `tokenpool serve` or `tokenpool up` at host:port instead")
    add_client_security_args(gen)
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=tuple(args.stop))
    start, first, count, reason = time.perf_counter(), None, 0, None
    pieces = _remote(args, sampling) if args.server else _local(args, sampling)
    for num_tokens, text, finish in pieces:
        first = first or time.perf_counter()
        count += num_tokens
        reason = finish or reason
        sys.stdout.write(text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    decode = (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0
    print(f"\n[{count} tokens, finish {reason}, first token {first - start:.2f} s, "
          f"{decode:.1f} tokens/s after it, {elapsed:.2f} s total]", file=sys.stderr)


def _local(args: argparse.Namespace, sampling: SamplingParams):
    """(new tokens, text, finish reason or None) from an engine in this process."""
    engine = LLMEngine(ensure_model(args.model), EngineConfig(
        dtype=args.dtype, compute_dtype=args.compute_dtype, num_threads=args.threads))
    print(engine.describe(), file=sys.stderr)
    for out in engine.stream(args.prompt, sampling, chat=args.chat):
        yield len(out.new_token_ids), out.text, out.finish_reason and out.finish_reason.value


def _remote(args: argparse.Namespace, sampling: SamplingParams):
    """The same, streamed from a running server's tokenpool.v1.Inference."""
    import grpc
    from tokenpool.protos.v1 import inference_pb2 as pb
    from tokenpool.protos.v1 import inference_pb2_grpc

    from .server_security import client_channel, client_metadata

    params = pb.SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                               top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
                               stop=sampling.stop)
    request = pb.GenerateRequest(model=args.model, text=args.prompt, chat=args.chat, sampling=params)
    metadata = client_metadata(args)
    with client_channel(args.server, args) as channel:
        try:
            for response in inference_pb2_grpc.InferenceStub(channel).Generate(request, metadata=metadata):
                finish = pb.FinishReason.Name(response.finish_reason) if response.finish_reason else None
                yield len(response.token_ids), response.text, finish and finish.removeprefix(
                    "FINISH_REASON_").lower()
        except grpc.RpcError as exc:
            raise ValueError(f"{args.server}: {exc.code().name}: {exc.details()}") from None
