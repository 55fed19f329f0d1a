"""DeferredReleases: request-table rows whose end the proxy could not write at once, because a
stalled process (stopped, hung) holds the row's lock; a thread ends each once the lock frees.

The proxy ends a request by writing its terminal state into its row and releasing the row
(end_row), on its event loop: microseconds, unless an instance stalled while writing that row's
progress. The shared-memory table then gives up after its lock timeout (TableLockTimeout)
instead of blocking the loop, and the row comes here. Its slot stays counted as used until the
stalled process runs again or dies (the kernel drops a dead process's locks), so nothing is
lost: the row is freed late, never twice, and never while another request could own it.
"""

from __future__ import annotations

import logging
import threading
import time

import msgspec
from tokenpool.proxy.request_table import RequestState, RequestTable, TableLockTimeout

log = logging.getLogger(__name__)

RETRY_S = 0.1  # between tries of the rows still locked
CLOSE_WAIT_S = 2.0  # close() tries what is left this long


def end_row(table: RequestTable, slot: int, state: RequestState) -> None:
    """Write the request's terminal state into its row, then release the row."""
    table.update(slot, lambda r: msgspec.structs.replace(r, updated_ns=time.time_ns(), state=state))
    table.release(slot)


class DeferredReleases:
    def __init__(self, table: RequestTable) -> None:
        self.table = table
        self._rows: dict[int, RequestState] = {}  # slot -> its terminal state
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def end(self, slot: int, state: RequestState) -> None:
        """end_row now, or (its lock held by a stalled process) as soon as the lock frees."""
        try:
            end_row(self.table, slot, state)
        except TableLockTimeout as exc:
            log.warning("%s; the row is released once that process lets go of it", exc)
            self._defer(slot, state)

    def pending(self) -> int:
        with self._cond:
            return len(self._rows)

    def close(self) -> None:
        """Stop the thread after trying the rows left for up to CLOSE_WAIT_S."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S + RETRY_S)

    def _defer(self, slot: int, state: RequestState) -> None:
        with self._cond:
            self._rows[slot] = state
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deferred-releases", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        closing_at = None
        while True:
            with self._cond:
                if self._closed and closing_at is None:
                    closing_at = time.monotonic()
                if not self._rows and self._closed:
                    return
                if closing_at is not None and time.monotonic() - closing_at > CLOSE_WAIT_S:
                    log.warning("%d request-table rows still locked by a stalled process at exit",
                                len(self._rows))
                    return
                while not self._rows and not self._closed:
                    self._cond.wait()
                rows = dict(self._rows)
            for slot, state in rows.items():
                try:
                    end_row(self.table, slot, state)
                except TableLockTimeout:
                    continue
                except Exception as exc:  # noqa: BLE001 -- e.g. released by recovery meanwhile: done
                    log.warning("request-table slot %d: ending its row failed: %s", slot, exc)
                with self._cond:
                    self._rows.pop(slot, None)
            with self._cond:
                if self._rows:
                    self._cond.wait(RETRY_S)
