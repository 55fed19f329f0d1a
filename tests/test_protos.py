"""The .proto files: generated code is current, and every RPC and field is documented."""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from tokenpool.protos import generate


def test_generated_code_is_current(tmp_path):
    written = generate.generate(tmp_path)
    assert written, "no .proto files found"
    for fresh in written:
        committed = generate.HERE / fresh.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run python -m tokenpool.protos.generate"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.name} is stale: run python -m tokenpool.protos.generate")


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.bin"
        args = ["protoc", f"-I{generate.VIRTUAL}={generate.HERE}", f"-I{include}",
                "--include_source_info", f"--descriptor_set_out={out}"]
        args += [f"{generate.VIRTUAL}/{p.relative_to(generate.HERE)}" for p in generate.proto_files()]
        assert protoc.main(args) == 0
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Names of services' RPCs and messages' fields that have no leading comment."""
    commented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}
    missing = []
    for i, service in enumerate(file.service):  # path: 6 = service, 2 = method
        missing += [f"{service.name}.{m.name}" for j, m in enumerate(service.method)
                    if (6, i, 2, j) not in commented]
    for i, message in enumerate(file.message_type):  # path: 4 = message, 2 = field
        missing += [f"{message.name}.{f.name}" for j, f in enumerate(message.field)
                    if (4, i, 2, j) not in commented]
    return missing


def test_every_rpc_and_field_has_a_comment():
    files = descriptor_set().file
    assert {f.package for f in files} >= {"tokenpool.v1", "tokenpool.internal.v1"}
    for file in files:
        if file.name.startswith(generate.VIRTUAL):
            assert undocumented(file) == [], file.name
