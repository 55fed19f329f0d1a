"""`tokenpool` command line: models, generate, bench."""

from __future__ import annotations

import argparse
import shlex
import sys

from tokenpool.bench import (
    attention_bench,
    engine_bench,
    kvtransfer_bench,
    serve_bench,
    simulator,
    switch_bench,
    tier_bench,
    tracing_bench,
)

from . import generate_command, models_command, profile_command, serve_command, status_command, up_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenpool", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    models_command.add_parser(commands)
    generate_command.add_parser(commands)
    serve_command.add_parser(commands)
    up_command.add_parser(commands)
    status_command.add_parser(commands)
    profile_command.add_parser(commands)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    engine_bench.add_parser(bench)
    switch_bench.add_parser(bench)
    serve_bench.add_parser(bench)
    attention_bench.add_parser(bench)
    tracing_bench.add_parser(bench)
    kvtransfer_bench.add_parser(bench)
    tier_bench.add_parser(bench)
    simulator.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["tokenpool", *argv])  # what reports record as their command
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, MemoryError) as exc:
        # Bad input of every kind ends here: one line naming the problem, no traceback.
        print(f"tokenpool: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
