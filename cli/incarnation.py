"""Which process answers at an address: every service's health check names its incarnation.

A service restarted on the address it had (`tokenpool up` restarting a crashed instance, Kubernetes
restarting a container in its pod) answers health checks again, possibly before a client's checks
ever failed often enough to call it lost. What it knew at run time (models added by the admin
service) died with the old process. So each process draws an id when it starts and sends it as
initial metadata on every health-check reply; a client that sees the id change knows the process
behind the address is new (proxy/fleet_backend.py brings such an instance in step before it takes
work again).

    server: health_pb2_grpc.add_HealthServicer_to_server(IncarnationHealthServicer(), server)
    client: call = stub.Check(request); reply = await call
            incarnation_of(await call.initial_metadata())   # -> "3f2a..." or "" (an older server)
"""

from __future__ import annotations

import uuid

from grpc_health.v1 import health

METADATA_KEY = "tokenpool-incarnation"
INCARNATION = uuid.uuid4().hex  # this process's: drawn once, at import


class IncarnationHealthServicer(health.aio.HealthServicer):
    """grpcio's health servicer, whose Check replies carry this process's incarnation."""

    async def Check(self, request, context):  # noqa: N802 - the gRPC method's name
        await context.send_initial_metadata(((METADATA_KEY, INCARNATION),))
        return await super().Check(request, context)


def incarnation_of(metadata) -> str:
    """The incarnation in a health-check reply's initial metadata; "" when it carries none."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value
    return ""
