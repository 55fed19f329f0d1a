"""TLS, mutual TLS and a bearer token on the public API: a second proxy process with them, in
front of a running stack's instances. Without the certificate or the token a client is
refused; health stays reachable; bad flags stop the proxy at start, by name."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import new_cert, new_key, pem, write_private
from stack_helpers import service
from tokenpool.compose.launcher import Stack, StackConfig
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODEL = "tiny-llama"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca_key = new_key()
    ca = new_cert("tokenpool test CA", ca_key, ca=True)
    server_key, client_key = new_key(), new_key()
    files = {"ca": pem(ca), "server_cert": pem(new_cert("proxy", server_key, ca, ca_key, ip="127.0.0.1")),
             "server_key": pem(server_key), "client_cert": pem(new_cert("client", client_key, ca, ca_key)),
             "client_key": pem(client_key), "token": (TOKEN + "\n").encode(), "empty": b"\n"}
    return write_private(root, files)


@pytest.fixture(scope="module")
def stack(tiny_dir, tmp_path_factory):
    config = StackConfig(models={MODEL: tiny_dir / MODEL}, prefill=1, decode=1, port=0, dtype="float32",
                         kv_mib=8, host_kv_mib=16, pool_mib=16, threads=1)
    stack = Stack(config, tmp_path_factory.mktemp("secure-logs"))
    stack.start(progress=lambda line: None)
    yield stack
    stack.stop()


def start_proxy(stack, tiny_dir, tmp_path, *flags):
    """-> (process, address or None, stderr text if it exited)."""
    ready = tmp_path / f"proxy-{uuid.uuid4().hex[:6]}.ready.json"
    args = [sys.executable, "-m", "tokenpool.proxy", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
            "--kvtransfer", service(stack, "kvtransfer-0").address,
            "--prefill", f"prefill-0={service(stack, 'prefill-0').address}",
            "--decode", f"decode-0={service(stack, 'decode-0').address}",
            "--model", f"{MODEL}={tiny_dir / MODEL}", "--table", f"secure-{uuid.uuid4().hex[:8]}",
            *map(str, flags)]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None:
            return process, None, process.stderr.read()
        assert time.monotonic() < deadline, "the proxy never got ready"
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["address"], ""


def stop(process):
    process.terminate()
    assert process.wait(30) == 0


def generate(channel, metadata=None):
    request = pb.GenerateRequest(model=MODEL, text="hello", sampling=pb.SamplingParams(max_tokens=3))
    return list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30, metadata=metadata))


def health(channel):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_tls_and_token_refuse_clients_without_them_and_health_stays_reachable(stack, tiny_dir, tmp_path, pki):
    process, address, err = start_proxy(stack, tiny_dir, tmp_path, "--tls-cert", pki["server_cert"],
                                        "--tls-key", pki["server_key"], "--auth-token-file", pki["token"])
    assert address, err
    try:
        with grpc.insecure_channel(address) as plain:  # no TLS at all: the handshake fails
            with pytest.raises(grpc.RpcError) as info:
                generate(plain)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(address, credentials) as tls:
            assert health(tls) == health_pb2.HealthCheckResponse.SERVING  # no token needed
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
                with pytest.raises(grpc.RpcError) as info:
                    generate(tls, metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            with pytest.raises(grpc.RpcError) as info:
                inference_pb2_grpc.InferenceStub(tls).ListModels(pb.ListModelsRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            responses = generate(tls, [("authorization", f"Bearer {TOKEN}")])
            assert sum(len(r.token_ids) for r in responses) == 3
    finally:
        stop(process)


def test_mutual_tls_refuses_a_client_without_a_certificate(stack, tiny_dir, tmp_path, pki):
    process, address, err = start_proxy(stack, tiny_dir, tmp_path, "--tls-cert", pki["server_cert"],
                                        "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"])
    assert address, err
    try:
        anonymous = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(address, anonymous) as channel:
            with pytest.raises(grpc.RpcError) as info:
                generate(channel)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        known = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes(),
                                             private_key=pki["client_key"].read_bytes(),
                                             certificate_chain=pki["client_cert"].read_bytes())
        with grpc.secure_channel(address, known) as channel:
            assert sum(len(r.token_ids) for r in generate(channel)) == 3
    finally:
        stop(process)


@pytest.mark.parametrize("flags, needle", [
    (["--tls-cert", "server_cert"], "--tls-cert and --tls-key go together"),
    (["--auth-token-file", "empty"], "--auth-token-file"),
    (["--auth-token-file", "missing"], "--auth-token-file"),
    (["--tls-client-ca", "ca"], "--tls-client-ca needs --tls-cert"),
])
def test_bad_security_flags_stop_the_proxy_at_start_by_name(stack, tiny_dir, tmp_path, pki, flags, needle):
    resolved = [str(pki.get(f, tmp_path / "nope")) if not f.startswith("--") else f for f in flags]
    process, address, err = start_proxy(stack, tiny_dir, tmp_path, *resolved)
    assert address is None and process.returncode == 1
    assert needle in err, err


def test_a_stack_started_with_tls_and_a_token_serves_tokenpool_generate_with_them(tiny_dir, tmp_path, pki,
                                                                                   capsys):
    from tokenpool.cli.main import main

    config = StackConfig(models={MODEL: tiny_dir / MODEL}, prefill=1, decode=1, port=0, dtype="float32",
                         kv_mib=8, host_kv_mib=16, pool_mib=16, threads=1, tls_cert=pki["server_cert"],
                         tls_key=pki["server_key"], auth_token_file=pki["token"])
    with Stack(config, tmp_path / "logs") as stack:
        stack.start(progress=lambda line: None)
        base = ["generate", "hello", "--model", MODEL, "--max-tokens", "3", "--server", stack.address]
        assert main([*base, "--tls-ca", str(pki["ca"]), "--token-file", str(pki["token"])]) == 0
        assert "[3 tokens" in capsys.readouterr().err
        assert main([*base, "--tls-ca", str(pki["ca"])]) == 2  # no token
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main([*base, "--tls-client-cert", str(pki["client_cert"])]) == 2
        assert "--tls-client-cert and --tls-client-key go together" in capsys.readouterr().err
