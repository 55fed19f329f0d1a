"""ProxyClient: the gateway's channel to the proxy's public gRPC API (tokenpool.v1.Inference)."""

from __future__ import annotations

import grpc
from tokenpool.protos.v1 import inference_pb2 as pb
from tokenpool.protos.v1 import inference_pb2_grpc

from .config import GatewayConfig

MAX_MESSAGE_BYTES = 4 << 20  # the proxy's own limit
LIST_TIMEOUT_S = 10.0
TOKENIZE_TIMEOUT_S = 30.0  # a prompt near the body limit through a slow chat template, on a busy proxy


class ProxyClient:
    def __init__(self, config: GatewayConfig) -> None:
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if config.proxy_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=config.proxy_ca.read_bytes())
            self.channel = grpc.aio.secure_channel(config.proxy, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(config.proxy, options=options)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    def generate(self, request: pb.GenerateRequest, metadata: tuple) -> grpc.aio.UnaryStreamCall:
        """The call (read it with read(); cancel() frees the request's KV at the proxy)."""
        return self.stub.Generate(request, metadata=metadata)

    async def list_models(self, metadata: tuple = ()) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=LIST_TIMEOUT_S)

    async def tokenize(self, request: pb.TokenizeRequest, metadata: tuple) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(request, metadata=metadata, timeout=TOKENIZE_TIMEOUT_S)

    async def detokenize(self, request: pb.DetokenizeRequest, metadata: tuple) -> pb.DetokenizeResponse:
        return await self.stub.Detokenize(request, metadata=metadata, timeout=TOKENIZE_TIMEOUT_S)

    async def close(self) -> None:
        await self.channel.close()
