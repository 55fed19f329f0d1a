"""The token services share: a stack started with it serves end to end while every internal
port refuses a caller without it (health exempt); services refuse to listen beyond loopback
without one; a token file others can read is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stack_helpers import service, start_tiny_stack
from tokenpool.cli import internal_token
from tokenpool.cli.main import main
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.internal.v1 import instances_pb2_grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """Point $TOKENPOOL_INTERNAL_TOKEN_FILE at a file (written by the test) for this test only."""
    path = tmp_path / "internal-token"

    def use(text: str | None, mode: int = 0o600) -> Path:
        if text is None:
            monkeypatch.delenv(internal_token.ENV, raising=False)
        else:
            path.write_text(text)
            path.chmod(mode)
            monkeypatch.setenv(internal_token.ENV, str(path))
        internal_token.internal_token.cache_clear()
        return path

    yield use
    monkeypatch.delenv(internal_token.ENV, raising=False)
    internal_token.internal_token.cache_clear()


def test_a_token_file_must_be_private_and_hold_a_token(token_env):
    token_env("s3cret\n")
    assert internal_token.internal_token() == "s3cret"
    assert internal_token.metadata() == (("authorization", "Bearer s3cret"),)
    token_env("s3cret\n", mode=0o644)
    with pytest.raises(ValueError, match="readable by its owner only"):
        internal_token.internal_token()
    token_env("\n")
    with pytest.raises(ValueError, match="first line must hold a token"):
        internal_token.internal_token()
    token_env(None)
    assert internal_token.internal_token() is None and internal_token.metadata() == ()


def test_listening_beyond_loopback_needs_the_token(token_env):
    token_env(None)
    for address in ("127.0.0.1:0", "localhost:7000", "[::1]:0"):
        internal_token.check_listen(address)
    for address in ("0.0.0.0:7000", "10.1.2.3:0", "node-7:7000"):
        with pytest.raises(ValueError, match=internal_token.ENV):
            internal_token.check_listen(address)
    token_env("s3cret\n")
    internal_token.check_listen("0.0.0.0:7000")


def test_an_agent_told_to_listen_on_every_address_without_a_token_does_not_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != internal_token.ENV}
    run = subprocess.run([sys.executable, "-m", "tokenpool.kvtransfer", "--listen", "0.0.0.0:0",
                          "--pool-mib", "4", "--slab-mib", "1", "--ready-file", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 1 and internal_token.ENV in run.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_stack_with_the_internal_token_serves_and_its_internal_ports_refuse_strangers(
        tiny_dir, tmp_path, capsys):
    stack = start_tiny_stack(tiny_dir, ["tiny-llama"], tmp_path / "logs", decode=1, internal_token=True)
    try:
        token_file = stack.token_file
        assert token_file is not None and (token_file.stat().st_mode & 0o777) == 0o600
        token = token_file.read_text().strip()
        with grpc.insecure_channel(stack.address) as channel:  # the public API: no internal token
            stub = inference_pb2_grpc.InferenceStub(channel)
            outputs = list(stub.Generate(pb.GenerateRequest(model="tiny-llama", text="hello there",
                                                            sampling=pb.SamplingParams(max_tokens=8,
                                                                                       ignore_eos=True)),
                                         timeout=120))
        assert sum(len(o.token_ids) for o in outputs) == 8  # every internal hop authenticated
        calls = {"prefill-0": lambda ch, md: instances_pb2_grpc.PrefillStub(ch).Status(
                     ipb.StatusRequest(), timeout=10, metadata=md),
                 "decode-0": lambda ch, md: instances_pb2_grpc.DecodeStub(ch).Status(
                     ipb.StatusRequest(), timeout=10, metadata=md),
                 "kvtransfer-0": lambda ch, md: instances_pb2_grpc.KVTransferStub(ch).Stats(
                     ipb.StatsRequest(), timeout=10, metadata=md)}
        for name, call in calls.items():
            with grpc.insecure_channel(service(stack, name).address) as channel:
                for metadata in ((), (("authorization", "Bearer not-the-token"),)):
                    with pytest.raises(grpc.RpcError) as refused:
                        call(channel, metadata)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                call(channel, (("authorization", f"Bearer {token}"),))  # the token opens it
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                   timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert main(["status"]) == 0  # reads the token named in the stack file
        out = capsys.readouterr().out.split(f"{stack.name} (launcher pid", 1)[1]  # this stack's lines
        ours = out.split("\nstack-", 1)[0]
        assert "hand-off pool" in ours and "unreachable" not in ours
    finally:
        stack.stop()
    assert not token_file.exists()
