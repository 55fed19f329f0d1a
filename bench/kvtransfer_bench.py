"""`tokenpool bench kvtransfer --json OUT`: the cross-node KV hand-off, streamed and not, against raw NIXL.

Two kvtransfer agents run as their own processes, each with its own pool: two "nodes" on this
machine with NIXL (UCX) between them. This process is the prefill instance: a MultiModelEngine
with SmolLM2 whose transport publishes through node 0's agent with node 1's as the destination.
Per prompt length:

    prefill_s             the prompt's prefill (first token out), in the unstreamed run
    handoff_unstreamed_s  prefill end -> KV readable on node 1: copy to node 0's pool, then Push
    handoff_streamed_s    the same when every layer is copied and pushed while later layers compute
                          (another prefill of the same prompt, prefill_streamed_s)
    transfer_gbps         bytes / seconds of the agent's NIXL WRITEs (Push) of those blocks: best of
                          the unstreamed hand-off's own and RAW_RUNS - 1 more with the engine idle
                          (handoff_push_gbps: the hand-off's own, right after the prefill)
    raw_nixl_gbps         one NIXL WRITE of the same bytes between two bare agents in two processes,
                          best of RAW_RUNS, measured in the same run

Ratios against the raw copy are what count on a noisy machine (STYLE 11).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenpool.cli.service_process import EXIT_WITH_PARENT, stop_process

LENGTHS = (512, 2048, 8192)
RAW_RUNS = 3
POLL_S = 0.0005  # as the agents poll their transfers
SLAB_MIB = 64  # large slabs: a sequence's blocks lie in few runs, so a push is few large descriptors


def add_parser(commands) -> None:
    p = commands.add_parser("kvtransfer", help="cross-node KV hand-off (NIXL): streamed vs not, vs raw NIXL")
    p.add_argument("--json", type=Path, required=True, help="write the rows here")
    p.add_argument("--model", default=None, help="folder or store name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS),
                   help="prompt lengths in tokens (two less than the context where they would not fit)")
    p.add_argument("--dtype", default="auto", help="weights and KV: auto, float32, bfloat16")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: torch's)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from tokenpool.cli.models_command import ensure_model
    from tokenpool.engine.model_store import DEFAULT_MODEL

    if any(n < 2 for n in args.lengths):
        raise ValueError(f"--lengths must be >= 2 tokens each, got {args.lengths}")
    folder = ensure_model(args.model or DEFAULT_MODEL)
    engine = _engine(folder, args, max(args.lengths))
    try:
        report = _measure(engine, args)
    finally:
        engine.close()
    report["command"] = args.command_line
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)
    print_table(report)
    print(f"wrote {args.json}")


def print_table(report: dict) -> None:
    print(f"{'tokens':>7}{'MiB':>8}{'prefill s':>11}{'streamed s':>12}{'unstreamed s':>14}"
          f"{'streamed/prefill':>18}{'GB/s':>7}{'raw GB/s':>10}{'of raw':>8}")
    for r in report["rows"]:
        print(f"{r['prompt_tokens']:>7}{r['bytes'] / 2**20:>8.1f}{r['prefill_s']:>11.2f}"
              f"{r['handoff_streamed_s']:>12.4f}{r['handoff_unstreamed_s']:>14.4f}"
              f"{r['handoff_streamed_s'] / r['prefill_s']:>18.2%}{r['transfer_gbps']:>7.2f}"
              f"{r['raw_nixl_gbps']:>10.2f}{r['transfer_gbps'] / r['raw_nixl_gbps']:>8.0%}")
    for note in report.get("notes", []):
        print(f"note: {note}")


# -- the engine and the two nodes ---------------------------------------------------------------------


def _engine(folder: Path, args: argparse.Namespace, max_tokens: int):
    from tokenpool.engine.host_kv_pool import HostKVPool
    from tokenpool.engine.host_model_cache import HostModelCache
    from tokenpool.engine.llm_engine import EngineConfig, resolve_dtypes
    from tokenpool.engine.model_config import ModelConfig
    from tokenpool.engine.multi_model_engine import InstanceConfig, MultiModelEngine, slot_bytes_for

    config = EngineConfig(dtype=args.dtype, num_threads=args.threads)
    model_config = ModelConfig.from_folder(folder)
    compute = resolve_dtypes(config, model_config)[1]
    per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * \
        torch.empty((), dtype=compute).element_size()
    kv_bytes = (max_tokens + 4 * config.block_size) * per_token
    slot = slot_bytes_for([folder], config)
    engine = MultiModelEngine(InstanceConfig(kv_bytes=kv_bytes, slot_bytes=slot, engine=config),
                              HostModelCache(), HostKVPool(64 << 20, slab_bytes=4 << 20))
    engine.register(f"kvbench-{folder.name}", folder)  # its own id in the node's host model cache
    return engine


class _Agent:
    def __init__(self, tmp: Path, name: str, peer: str, pool_mib: int) -> None:
        ready = tmp / f"{name}.json"
        self.log = tmp / f"{name}.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tokenpool.kvtransfer", "--name", name, "--listen", "127.0.0.1:0",
                 "--pool-mib", str(pool_mib), "--slab-mib", str(SLAB_MIB), "--nixl", "--allow-peer", peer,
                 "--ready-file", str(ready)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, EXIT_WITH_PARENT: "1"})  # gone with this process, however it ends
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvtransfer agent {name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.address = json.loads(ready.read_text())["address"]

    def stop(self) -> None:
        stop_process(self.process, 15)


def _measure(engine, args: argparse.Namespace) -> dict:
    from tokenpool.kvtransfer.transport import NodeLocalTransport

    model = engine.models[_model_id(engine)]
    max_len = model.book.max_model_len
    lengths = [min(n, max_len - 2) for n in args.lengths]  # room for the first token and one more
    block_bytes = model.shape.nbytes
    need_mib = (max(lengths) // model.shape.block_size + 2) * block_bytes * 5 // 4 >> 20
    pool_mib = (need_mib // SLAB_MIB + 2) * SLAB_MIB
    notes = [f"{n} tokens do not fit the model's {max_len}-token context with two tokens to generate: "
             f"measured {n2}" for n, n2 in zip(args.lengths, lengths, strict=True) if n != n2]
    with tempfile.TemporaryDirectory() as tmp:
        agents = [_Agent(Path(tmp), "kvtransfer-0", "kvtransfer-1", pool_mib),
                  _Agent(Path(tmp), "kvtransfer-1", "kvtransfer-0", pool_mib)]
        try:
            with NodeLocalTransport(agents[0].address, timeout_s=60) as sender, \
                    NodeLocalTransport(agents[1].address, timeout_s=60) as receiver:
                _handoff(engine, sender, receiver, agents[1].address, 64, streamed=False)  # warm-up, connect
                _handoff(engine, sender, receiver, agents[1].address, 64, streamed=True)
                rows = [_row(engine, sender, receiver, agents[1].address, n) for n in lengths]
        finally:
            for agent in agents:
                agent.stop()
    return {"model": _model_id(engine).removeprefix("kvbench-"), "kv_dtype": model.shape.dtype,
            "threads": torch.get_num_threads(),
            "block_bytes": block_bytes, "rows": rows, "notes": notes}


def _row(engine, sender, receiver, destination: str, n: int) -> dict:
    unstreamed = _handoff(engine, sender, receiver, destination, n, streamed=False)
    streamed = _handoff(engine, sender, receiver, destination, n, streamed=True)
    raw = _raw_nixl_gbps(unstreamed["bytes"])
    row = {"prompt_tokens": n, "bytes": unstreamed["bytes"], "prefill_s": unstreamed["prefill_s"],
           "handoff_streamed_s": streamed["handoff_s"], "handoff_unstreamed_s": unstreamed["handoff_s"],
           "transfer_gbps": max(unstreamed["push_gbps"]), "raw_nixl_gbps": raw,
           "prefill_streamed_s": streamed["prefill_s"], "handoff_push_gbps": unstreamed["push_gbps"][0]}
    print(f"  {n} tokens: prefill {row['prefill_s']:.2f} s, hand-off streamed "
          f"{row['handoff_streamed_s']:.4f} s, unstreamed {row['handoff_unstreamed_s']:.4f} s, "
          f"{row['transfer_gbps']:.2f} GB/s (raw {raw:.2f})", flush=True)
    return row


def _handoff(engine, sender, receiver, destination: str, n: int, streamed: bool) -> dict:
    """One prefill of n tokens and its KV to the other node -> prefill_s, handoff_s, bytes.

    The hand-off ends when node 1's blocks are ready and mapped there (fetch), as a decode
    instance would find them; the copies match the engine's device blocks exactly.
    """
    from tokenpool.engine.sampling_params import SamplingParams

    model = engine.models[_model_id(engine)]
    ids = torch.randint(0, model.profile.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    rid = f"bench-{n}-{'s' if streamed else 'u'}-{time.monotonic_ns()}"
    pushed = sender.pushed_bytes, sender.push_seconds
    start = time.perf_counter()
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request(model.profile.model_id, ids.tolist(), sampling, request_id=rid)
    stream = None
    if streamed:
        stream = sender.begin(rid, model.shape, -(-n // model.shape.block_size), destination)
        engine.stream_kv(model.profile.model_id, rid, stream.put)
    try:
        while not any(o.request_id == rid for o in engine.step(model.profile.model_id)):
            pass
        prefill_end = time.perf_counter()
        shape, blocks = engine.handoff_blocks(model.profile.model_id, rid)
        if stream is not None:
            handle = stream.finish(n)
        else:
            handle = sender.publish(rid, shape, blocks, n, destination)
        views = receiver.fetch(handle)
        done = time.perf_counter()
        assert all(torch.equal(v, b) for v, b in zip(views, blocks, strict=True)), "KV moved inexactly"
        receiver.release(handle)
        push_gbps = [] if streamed else _push_rates(sender, receiver, rid, shape, blocks, n, destination,
                                                   pushed)
    finally:
        engine.abort(model.profile.model_id, rid)
    return {"prefill_s": prefill_end - start, "handoff_s": done - prefill_end,
            "bytes": len(blocks) * shape.nbytes, "push_gbps": push_gbps}


def _push_rates(sender, receiver, rid: str, shape, blocks, n: int, destination: str, pushed) -> list[float]:
    """GB/s of the hand-off's own NIXL push (right after the prefill), then of RAW_RUNS - 1 more
    publishes of the same blocks with the engine idle, as the raw copy runs."""
    rates = [(sender.pushed_bytes - pushed[0]) / (sender.push_seconds - pushed[1]) / 1e9]
    for k in range(RAW_RUNS - 1):
        before = sender.pushed_bytes, sender.push_seconds
        receiver.release(sender.publish(f"{rid}-again-{k}", shape, blocks, n, destination))
        rates.append((sender.pushed_bytes - before[0]) / (sender.push_seconds - before[1]) / 1e9)
    return rates


# -- the raw NIXL baseline --------------------------------------------------------------------------------


def _raw_nixl_gbps(nbytes: int) -> float:
    """Best of RAW_RUNS single WRITEs of nbytes from this process to a bare NIXL agent in another."""
    from nixl._api import nixl_agent, nixl_agent_config
    from tokenpool.kvtransfer.nixl_link import AGENT_CONFIG, UCX_PARAMS

    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    target = context.Process(target=_raw_target, args=(theirs, nbytes), daemon=True)
    target.start()
    try:
        metadata = mine.recv_bytes()  # bytes only: nothing is unpickled from the other side
        address = int.from_bytes(mine.recv_bytes(), "little")
        agent = nixl_agent("raw-initiator", nixl_agent_config(**AGENT_CONFIG))
        agent.create_backend("UCX", UCX_PARAMS)
        source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        registered = agent.register_memory(source)
        peer = agent.add_remote_agent(metadata)
        local = agent.get_xfer_descs([(source.data_ptr(), nbytes, 0)], "DRAM")
        remote = agent.get_xfer_descs([(address, nbytes, 0)], "DRAM")
        best = float("inf")
        for _ in range(RAW_RUNS):
            start = time.perf_counter()
            handle = agent.initialize_xfer("WRITE", local, remote, peer)
            state = agent.transfer(handle)
            while state == "PROC":
                time.sleep(POLL_S)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"raw NIXL WRITE failed: {state}")
            best = min(best, time.perf_counter() - start)
            agent.release_xfer_handle(handle)
        agent.remove_remote_agent(peer)
        agent.deregister_memory(registered)
        return nbytes / best / 1e9
    finally:
        mine.send_bytes(b"done")
        target.join(30)


def _raw_target(conn, nbytes: int) -> None:
    from nixl._api import nixl_agent, nixl_agent_config
    from tokenpool.kvtransfer.nixl_link import AGENT_CONFIG, UCX_PARAMS

    agent = nixl_agent("raw-target", nixl_agent_config(**AGENT_CONFIG))
    agent.create_backend("UCX", UCX_PARAMS)
    buffer = torch.ones(nbytes, dtype=torch.uint8)  # written: its pages faulted in, as the agents' pools
    agent.register_memory(buffer)
    conn.send_bytes(agent.get_agent_metadata())
    conn.send_bytes(buffer.data_ptr().to_bytes(8, "little"))
    conn.recv_bytes()  # "done"


def _model_id(engine) -> str:
    """The one model the bench's engine registered."""
    return next(iter(engine.models))
