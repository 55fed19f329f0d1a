"""DeferredReleases: request-table rows whose end the proxy could not write at once, for a
reason that passes (a stalled process holds the row's lock, the table's server did not answer);
a thread ends each as soon as it can.

The proxy ends a request by writing its terminal state into its row and releasing the row
(end_row), on its event loop: microseconds, unless an instance stalled while writing that row's
progress (the shared-memory table gives up after its lock timeout, TableLockTimeout, instead of
blocking the loop) or Redis did not answer within its socket timeout. The row then comes here
rather than staying used for good. Its slot counts as used until the end is written, so nothing
is lost: the row is freed late, never twice, and never while another request could own it. A
row already free, or a table that fenced this proxy (its rows are the survivors' to reclaim),
needs nothing more; one still failing after GIVE_UP_S is left, with a warning.
"""

from __future__ import annotations

import logging
import threading
import time

import msgspec
from tokenpool.proxy.request_table import RequestState, RequestTable, SlotFreeError, TableFencedError

log = logging.getLogger(__name__)

RETRY_S = 0.1  # between tries of the rows not ended yet
CLOSE_WAIT_S = 2.0  # close() tries what is left this long
GIVE_UP_S = 300.0  # a row whose end still fails after this long is left to the table's recovery
DONE = (SlotFreeError, TableFencedError)  # nothing more to do for the row


def end_row(table: RequestTable, slot: int, state: RequestState) -> None:
    """Write the request's terminal state into its row, then release the row."""
    table.update(slot, lambda r: msgspec.structs.replace(r, updated_ns=time.time_ns(), state=state))
    table.release(slot)


class DeferredReleases:
    def __init__(self, table: RequestTable) -> None:
        self.table = table
        self._rows: dict[int, tuple[RequestState, float]] = {}  # slot -> terminal state, deferred at
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def end(self, slot: int, state: RequestState) -> None:
        """end_row now, or (it failed for a reason that may pass) from the thread, retried."""
        try:
            end_row(self.table, slot, state)
        except DONE:
            pass
        except Exception as exc:  # noqa: BLE001 -- a stalled lock holder, a table server gone quiet
            log.warning("request-table slot %d: ending its row failed (%s); trying again until it "
                        "works", slot, exc)
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
            self._rows[slot] = (state, time.monotonic())
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
                    log.warning("%d request-table rows not ended at exit", len(self._rows))
                    return
                while not self._rows and not self._closed:
                    self._cond.wait()
                rows = dict(self._rows)
            for slot, (state, since) in rows.items():
                if not self._tried(slot, state, since):
                    continue
                with self._cond:
                    self._rows.pop(slot, None)
            with self._cond:
                if self._rows:
                    self._cond.wait(RETRY_S)

    def _tried(self, slot: int, state: RequestState, since: float) -> bool:
        """One more try at a deferred row -> whether it needs nothing more."""
        try:
            end_row(self.table, slot, state)
        except DONE:
            pass
        except Exception as exc:  # noqa: BLE001 -- still locked, or the server still away
            if time.monotonic() - since < GIVE_UP_S:
                return False
            log.warning("request-table slot %d: its row could not be ended for %g s (%s); left to the "
                        "table's recovery", slot, GIVE_UP_S, exc)
        return True
