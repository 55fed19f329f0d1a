"""`tokenpool generate`: stream one completion to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from tokenpool.engine.llm_engine import EngineConfig, LLMEngine
from tokenpool.engine.model_store import DEFAULT_MODEL
from tokenpool.engine.sampling_params import SamplingParams

from .models_command import ensure_model


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
    gen.add_argument("--threads", type=int, default=None)
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=tuple(args.stop))
    engine = LLMEngine(ensure_model(args.model),
                       EngineConfig(dtype=args.dtype, num_threads=args.threads))
    print(engine.describe(), file=sys.stderr)
    start, first, count, reason = time.perf_counter(), None, 0, None
    for out in engine.stream(args.prompt, sampling, chat=args.chat):
        first = first or time.perf_counter()
        count += len(out.new_token_ids)
        reason = out.finish_reason
        sys.stdout.write(out.text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    decode = (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0
    print(f"\n[{count} tokens, finish {reason.value}, first token {first - start:.2f} s, "
          f"{decode:.1f} tokens/s after it, {elapsed:.2f} s total]", file=sys.stderr)
