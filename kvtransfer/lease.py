"""KV hand-off leases: how long a handed-over handle is held for its receiver, and the receiver's
heartbeat that holds it.

    agent (sender's pool)                          decode instance (receiver)
    MarkReady  -> lease runs DEFAULT_LEASE_S       Decode RPC arrives: hold(handle)
               <- Renew([held ids])  every RENEW_INTERVAL_S, while any is held
    Release    <-------------------------------    KV adopted: let_go(handle), Release
    sweep: a ready handle not renewed within its lease is freed (the receiver died or never came)

The renewer runs on the receiver's event loop; renewing is best effort (a failed heartbeat is
logged and retried at the next tick; the lease outlives several missed ones).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 10.0  # a ready handle not renewed this long is freed
RENEW_INTERVAL_S = 0.5  # how often a receiver renews the handles it holds
MIN_LEASE_S = 4 * RENEW_INTERVAL_S  # a lease must survive a few missed heartbeats


class LeaseRenewer:
    """The handles this receiver holds, renewed every interval_s through renew(ids) -> the ids
    the agent no longer knows (they are dropped here: nothing to hold any more)."""

    def __init__(self, renew: Callable[[Sequence[str]], Awaitable[Sequence[str]]],
                 interval_s: float = RENEW_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self._renew = renew
        self.interval_s = interval_s
        self._held: dict[str, int] = {}  # handle id -> holders (a retried request may hold it twice)
        self._task: asyncio.Task | None = None
        self.renewals = 0  # heartbeats sent, for tests and metrics

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def hold(self, handle_id: str) -> None:
        self._held[handle_id] = self._held.get(handle_id, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kv-lease-renewer")

    def let_go(self, handle_id: str) -> None:
        left = self._held.get(handle_id, 0) - 1
        if left > 0:
            self._held[handle_id] = left
        else:
            self._held.pop(handle_id, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self._held:
            await asyncio.sleep(self.interval_s)
            ids = list(self._held)
            if not ids:
                break
            try:
                gone = await self._renew(ids)
            except Exception as exc:  # noqa: BLE001 - retried at the next tick; the lease covers a few
                log.warning("renewing %d KV handle leases failed: %s", len(ids), exc)
                continue
            self.renewals += 1
            for handle_id in gone:
                self._held.pop(handle_id, None)
