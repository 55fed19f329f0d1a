"""The gRPC server of a single-node stack: Inference, health checking and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenpool.protos.v1 import inference_pb2, inference_pb2_grpc

from .inference_servicer import InferenceServicer

MAX_MESSAGE_BYTES = 4 << 20  # a larger request is refused with RESOURCE_EXHAUSTED


async def start_server(address: str, servicer: InferenceServicer) -> tuple[grpc.aio.Server, int]:
    """Start serving on address ('host:port'; port 0 picks one) -> (server, port)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    reflection.enable_server_reflection(
        (service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ("", service):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
