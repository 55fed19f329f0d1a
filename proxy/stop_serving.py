"""stop_serving: how a server of tokenpool.v1.Inference stops (SIGTERM, or a proxy fenced by its table).

    health NOT_SERVING  ->  notice_s: new calls get the servicer's own answer  ->  port closed,
    streams in flight get STOP_GRACE_S  ->  those still running end UNAVAILABLE, naming why

The last step is what a client sees instead of a stream cut off mid-way (CANCELLED, or a
reset connection, when the grace ends): a status that says why and that retrying elsewhere, or
here once restarted, is the way on. Their requests' KV is freed as for any failed stream.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

STOP_GRACE_S = 5.0  # streams in flight get this long once the port closes
END_BEFORE_S = 1.0  # ...less this: the streams still running are ended with a status, which must reach them

log = logging.getLogger(__name__)


async def stop_serving(server, servicer, notice_s: float, why: str) -> None:
    """server: cli.service_process.RunningServer; servicer: its proxy.InferenceServicer; why: the
    reason streams still running at the end are given ("the proxy is shutting down")."""
    await server.health.enter_graceful_shutdown()
    await asyncio.sleep(notice_s)
    stopped = asyncio.ensure_future(server.grpc.stop(STOP_GRACE_S))
    if not await servicer.drained(STOP_GRACE_S - END_BEFORE_S):
        ended = servicer.end_streams(grpc.StatusCode.UNAVAILABLE, f"{why}; this stream did not end within "
                                     f"the {STOP_GRACE_S:g} s stop grace: retry the request")
        log.warning("%s: ended %d streams still in flight after %g s with UNAVAILABLE", why, ended,
                    STOP_GRACE_S - END_BEFORE_S)
    await stopped
