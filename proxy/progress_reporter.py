"""ProgressReporter: progress in the proxies' request table, written off the event loop.

The instances' servicers report each stage of a request (prefilling on X, transferring, decoding
on Y, tokens so far), and the proxy its streams' tokens so far, with report(), which never blocks
and never raises: it merges the changes into the request's pending write and wakes one writer
thread. That thread attaches the table (it
retries until a proxy has made it: instances start first), then applies the pending writes
with touch_record, in the order they were first reported.

Reporting is best-effort. A table that fails (Redis unreachable or slow for a while) costs a
logged warning and a counted failure; the writes stay pending, merged with whatever is reported
meanwhile, and are retried with a growing pause, so an outage leaves one write per request
behind, never a backlog, and nothing waits on it but this thread. Metrics (with a registry):

    tokenpool_table_reports_total{outcome}   written | gone (the row was released or holds
                                             another request) | failed (retried) | locked (the
                                             row held by a stalled process: retried, the other
                                             rows written meanwhile) | dropped (more than
                                             MAX_PENDING requests waiting)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from tokenpool.proxy.request_table import RequestTable, TableLockTimeout, touch_record

log = logging.getLogger(__name__)

MAX_PENDING = 4096  # requests with a write waiting; beyond it the oldest is dropped
ATTACH_POLL_S = 0.2  # until the proxy has made the table
RETRY_MIN_S, RETRY_MAX_S = 0.1, 5.0  # after a failed write, doubling
WARN_EVERY_S = 30.0  # an outage is logged when it starts, then at most this often
CLOSE_WAIT_S = 5.0  # close() lets the writer finish what is pending this long

Key = tuple[int, str]  # (slot, request id as dispatched)


class ProgressReporter:
    """Writes instances' progress into the table that `attach()` returns (called on the writer thread)."""

    def __init__(self, attach: Callable[[], RequestTable], registry=None, name: str = "table",
                 close_table: bool = True) -> None:
        """close_table: close the attached table when the writer stops (False: its owner closes it,
        as the proxy does its own table)."""
        self.name = name
        self.table: RequestTable | None = None
        self._attach = attach
        self._close_table = close_table
        self._pending: dict[Key, dict[str, Any]] = {}
        self._busy = False  # the writer holds a batch
        self._cond = threading.Condition()
        self._closed = False
        self._failures = 0  # in a row
        self._warned_at = float("-inf")
        self._counts = _counter(registry)
        self._thread = threading.Thread(target=self._run, name=f"progress-{name}", daemon=True)
        self._thread.start()

    def report(self, slot: int | None, request_id: str, **changes: Any) -> None:
        """Queue changes to the row in `slot` if it still holds request_id (touch_record); at once."""
        if slot is None:
            return
        with self._cond:
            if self._closed:
                return
            key = (slot, request_id)
            self._pending[key] = {**self._pending.get(key, {}), **changes}
            if len(self._pending) > MAX_PENDING:
                del self._pending[next(iter(self._pending))]
                self._count("dropped")
            self._cond.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until every report so far has been tried and none is waiting -> whether it got there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Stop after the pending writes (up to CLOSE_WAIT_S, none while the table fails); closes the
        table (idempotent)."""
        if self.table is not None and not self._failures:
            self.flush(CLOSE_WAIT_S)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(CLOSE_WAIT_S)

    def _count(self, outcome: str, n: int = 1) -> None:
        if self._counts is not None and n:
            self._counts.labels(outcome).inc(n)

    # ---- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._wait_attached()
            while (batch := self._next_batch()) is not None:
                self._write(batch)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            if self.table is not None and self._close_table:
                self.table.close()

    def _wait_attached(self) -> None:
        while True:
            try:
                self.table = self._attach()
                log.info("reporting progress into request table %s", self.name)
                return
            except FileNotFoundError:  # no proxy has made it yet
                pass
            except Exception as exc:  # noqa: BLE001 -- e.g. Redis not up yet: keep trying
                self._failed(exc, "attaching")
            if self._pause(ATTACH_POLL_S):
                return

    def _next_batch(self) -> dict[Key, dict[str, Any]] | None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()  # flush() waiters
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch, self._pending, self._busy = self._pending, {}, True
            return batch

    def _write(self, batch: dict[Key, dict[str, Any]]) -> None:
        items = list(batch.items())
        locked = []
        for done, ((slot, request_id), changes) in enumerate(items):
            try:
                written = touch_record(self.table, slot, request_id, **changes)
            except TableLockTimeout:  # a stalled process holds this row: the others go on
                locked.append(((slot, request_id), changes))
                self._count("locked")
                continue
            except Exception as exc:  # noqa: BLE001 -- the table is unreachable: retry these later
                self._requeue(locked + items[done:])
                self._failed(exc, "writing")
                self._pause(min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(self._failures, 16)))
                return
            self._count("written" if written else "gone")
            self._recovered()
        if locked:  # tried again after a pause, merged with what is reported meanwhile
            self._requeue(locked)
            self._pause(RETRY_MIN_S)

    def _requeue(self, items: list[tuple[Key, dict[str, Any]]]) -> None:
        """Put failed writes back before what was reported meanwhile (newer changes win)."""
        with self._cond:
            newer = self._pending
            self._pending = dict(items)
            for key, changes in newer.items():
                self._pending[key] = {**self._pending.get(key, {}), **changes}
            while len(self._pending) > MAX_PENDING:
                del self._pending[next(iter(self._pending))]
                self._count("dropped")

    def _failed(self, exc: Exception, doing: str) -> None:
        self._failures += 1
        self._count("failed")
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("request table %s: %s progress failed (%d in a row; the instance serves on, "
                        "progress is retried): %s", self.name, doing, self._failures, exc)

    def _recovered(self) -> None:
        if self._failures:
            log.warning("request table %s: reporting progress again after %d failures", self.name,
                        self._failures)
            self._failures, self._warned_at = 0, float("-inf")

    def _pause(self, seconds: float) -> bool:
        """Sleep unless closed -> whether closed."""
        with self._cond:
            if not self._closed:
                self._cond.wait(seconds)
            return self._closed


def _counter(registry):
    if registry is None:
        return None
    from prometheus_client import Counter

    return Counter("tokenpool_table_reports", "Progress writes into the request table, by outcome",
                   ["outcome"], registry=registry)
