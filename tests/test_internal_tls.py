"""Mutual TLS between services: a stack started with a certificate, its key and the CA serves end to
end (proxy -> instances and agent, instances -> agent, all over TLS) while each internal port
refuses a plaintext caller, a caller without a certificate and one whose certificate another CA
signed; `tokenpool status` reaches them; bad files are refused before anything starts."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import internal_tls_files, new_cert, new_key, pem, write_private
from stack_helpers import SMALL_STACK, expected_streams, service, start_tiny_stack
from tokenpool.cli import internal_tls, internal_token
from tokenpool.cli.main import main
from tokenpool.compose.launcher import StackConfig
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

MODEL = "tiny-llama"
INTERNAL = ("kvtransfer-0", "prefill-0", "decode-0")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The stack's CA and the certificate its services share (for 127.0.0.1); a stranger's CA and
    a certificate it signed for a client."""
    root = tmp_path_factory.mktemp("internal-pki")
    ours = internal_tls_files(root)
    other_key, stranger_key = new_key(), new_key()
    other = new_cert("someone else's CA", other_key, ca=True)
    files = {"stranger_key": pem(stranger_key), "not_pem": b"hello\n",
             "stranger_cert": pem(new_cert("stranger", stranger_key, other, other_key))}
    return {**write_private(root, files), "cert": ours["internal_tls_cert"], "key": ours["internal_tls_key"],
            "ca": ours["internal_tls_ca"]}


@pytest.fixture
def tls_env(monkeypatch):
    """Set (or clear) the three internal TLS variables for this test only."""
    def use(cert=None, key=None, ca=None):
        for name, path in zip(internal_tls.ENVS, (cert, key, ca), strict=True):
            if path is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(path))
        internal_tls.internal_tls.cache_clear()

    monkeypatch.delenv(internal_token.ENV, raising=False)
    internal_token.internal_token.cache_clear()
    yield use
    use()
    monkeypatch.undo()
    internal_tls.internal_tls.cache_clear()


def test_internal_tls_needs_all_three_readable_pem_files_and_a_private_key(pki, tls_env, tmp_path):
    tls_env()
    assert internal_tls.internal_tls() is None
    tls_env(cert=pki["cert"])
    with pytest.raises(ValueError, match=f"{internal_tls.KEY_ENV}, {internal_tls.CA_ENV} are not set"):
        internal_tls.internal_tls()
    tls_env(pki["cert"], pki["key"], pki["not_pem"])
    with pytest.raises(ValueError, match=f"{internal_tls.CA_ENV}=.*no PEM certificate"):
        internal_tls.internal_tls()
    tls_env(pki["cert"], tmp_path / "missing", pki["ca"])
    with pytest.raises(ValueError, match=f"{internal_tls.KEY_ENV}=.*No such file"):
        internal_tls.internal_tls()
    shared = tmp_path / "shared-key"
    shared.write_bytes(pki["key"].read_bytes())
    shared.chmod(0o644)
    tls_env(pki["cert"], shared, pki["ca"])
    with pytest.raises(ValueError, match="private key must be readable by its owner only"):
        internal_tls.internal_tls()
    tls_env(pki["cert"], pki["key"], pki["ca"])
    assert internal_tls.internal_tls().ca == pki["ca"].read_bytes()
    internal_token.check_listen("0.0.0.0:7000")  # mutual TLS authenticates callers as a token does
    tls_env()
    with pytest.raises(ValueError, match=internal_tls.CERT_ENV):
        internal_token.check_listen("0.0.0.0:7000")


def test_a_stack_config_refuses_half_or_bad_internal_tls_before_starting(tiny_dir, pki):
    models = {MODEL: tiny_dir / MODEL}
    with pytest.raises(ValueError, match="internal_tls_cert, internal_tls_key and internal_tls_ca go "):
        StackConfig(models=models, internal_tls_cert=pki["cert"], internal_tls_key=pki["key"])
    with pytest.raises(ValueError, match="internal_tls_cert=.*no PEM certificate"):
        StackConfig(models=models, internal_tls_cert=pki["not_pem"], internal_tls_key=pki["key"],
                    internal_tls_ca=pki["ca"])


def health(address: str, credentials: grpc.ChannelCredentials | None) -> int | grpc.StatusCode:
    """The health status a caller gets, or the status code of its refusal."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return reply.status


def test_a_stack_with_internal_tls_serves_and_its_internal_ports_take_only_its_certificates(
        tiny_dir, pki, tls_env, tmp_path, capsys):
    tls_env()  # the test process itself has none: only what the launcher gives its services
    jobs = [(MODEL, "The quick brown fox", 12)]
    expected = expected_streams(tiny_dir, jobs)
    stack = start_tiny_stack(tiny_dir, [MODEL], tmp_path / "logs", decode=1, internal_tls_cert=pki["cert"],
                             internal_tls_key=pki["key"], internal_tls_ca=pki["ca"])
    try:
        with grpc.insecure_channel(stack.address) as channel:  # the public port is the public API's
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.GenerateRequest(model=MODEL, text="The quick brown fox",
                                         sampling=pb.SamplingParams(max_tokens=12, ignore_eos=True))
            tokens = [t for out in stub.Generate(request, timeout=120) for t in out.token_ids]
        assert tokens == expected[jobs[0]][0]  # every internal hop over mutual TLS

        ca = pki["ca"].read_bytes()
        ours = grpc.ssl_channel_credentials(ca, pki["key"].read_bytes(), pki["cert"].read_bytes())
        no_certificate = grpc.ssl_channel_credentials(ca)
        stranger = grpc.ssl_channel_credentials(ca, pki["stranger_key"].read_bytes(),
                                                pki["stranger_cert"].read_bytes())
        for name in INTERNAL:
            address = service(stack, name).address
            assert health(address, ours) == health_pb2.HealthCheckResponse.SERVING, name
            for caller in (None, no_certificate, stranger):
                assert health(address, caller) == grpc.StatusCode.UNAVAILABLE, (name, caller)

        assert main(["status"]) == 0  # it reads the stack's certificate files from the stack file
        out = capsys.readouterr().out.split(f"{stack.name} (launcher pid", 1)[1]  # this stack's lines
        ours = out.split("\nstack-", 1)[0]
        assert "hand-off pool" in ours and "aegaeon; active" in ours and "unreachable" not in ours, ours
    finally:
        stack.stop()


def test_the_stacks_services_get_the_tls_files_and_nothing_else_does(tiny_dir, pki, tmp_path, monkeypatch):
    """The launcher passes the three files to its services and drops any set around it."""
    from tokenpool.compose.launcher import Stack

    for name in internal_tls.ENVS:
        monkeypatch.setenv(name, str(pki["not_pem"]))

    files = {"internal_tls_cert": pki["cert"], "internal_tls_key": pki["key"], "internal_tls_ca": pki["ca"]}
    with_tls = Stack(StackConfig(models={MODEL: tiny_dir / MODEL}, **SMALL_STACK, **files), tmp_path / "a")
    env = with_tls._env("decode-0")
    assert [env[name] for name in internal_tls.ENVS] == [str(pki[k]) for k in ("cert", "key", "ca")]
    without = Stack(StackConfig(models={MODEL: tiny_dir / MODEL}, **SMALL_STACK), tmp_path / "b")
    assert not set(internal_tls.ENVS) & set(without._env("decode-0"))
