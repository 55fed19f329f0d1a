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

An admission whose call to a remote table failed may still have happened: Redis runs a command
it received before it stalled once it runs again, after the client gave up on the reply. The
proxy then retracts it (retract): the thread looks for the row, and releases it if it is that
admission's (same request id and creation time), until the server has answered that it is not
there for RETRACT_WINDOW_S.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec
from tokenpool.proxy.request_table import (
    RequestRecord,
    RequestState,
    RequestTable,
    SlotFreeError,
    TableFencedError,
)

log = logging.getLogger(__name__)

RETRY_S = 0.1  # between tries of the rows not ended yet
CLOSE_WAIT_S = 2.0  # close() tries what is left this long
GIVE_UP_S = 300.0  # a row whose end still fails after this long is left to the table's recovery
RETRACT_WINDOW_S = 10.0  # a retraction stops looking once the row was absent this long
DONE = (SlotFreeError, TableFencedError)  # nothing more to do for the row


def end_row(table: RequestTable, slot: int, state: RequestState) -> None:
    """Write the request's terminal state into its row, then release the row."""
    table.update(slot, lambda r: msgspec.structs.replace(r, updated_ns=time.time_ns(), state=state))
    table.release(slot)


class DeferredReleases:
    def __init__(self, table: RequestTable) -> None:
        self.table = table
        # What is still to do, each tried by the thread until it answers True (done).
        self._jobs: dict[tuple[str, object], Callable[[], bool]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def end(self, slot: int, state: RequestState) -> None:
        """end_row now, or (it failed for a reason that may pass) from the thread, retried. A
        remote table's rows are ended from the thread only: the caller is an event loop."""
        job = _Ending(self.table, slot, state)
        if self.table.remote or not job():
            self._add(("end", slot), job)

    def retract(self, record: RequestRecord) -> None:
        """An insert of `record` failed without saying whether it happened: release its row if it
        turns up (from the thread)."""
        self._add(("retract", record.request_id), _Retraction(self.table, record))

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs)

    def close(self) -> None:
        """Stop the thread after trying what is left for up to CLOSE_WAIT_S."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S + RETRY_S)

    def _add(self, key: tuple[str, object], job: Callable[[], bool]) -> None:
        with self._cond:
            self._jobs[key] = job
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
                if not self._jobs and self._closed:
                    return
                if closing_at is not None and time.monotonic() - closing_at > CLOSE_WAIT_S:
                    log.warning("%d request-table rows not ended at exit", len(self._jobs))
                    return
                while not self._jobs and not self._closed:
                    self._cond.wait()
                jobs = dict(self._jobs)
            for key, job in jobs.items():
                if job():
                    with self._cond:
                        if self._jobs.get(key) is job:
                            del self._jobs[key]
            with self._cond:
                if self._jobs:
                    self._cond.wait(RETRY_S)


class _Ending:
    """One row's end, tried until it works (or GIVE_UP_S)."""

    def __init__(self, table: RequestTable, slot: int, state: RequestState) -> None:
        self.table, self.slot, self.state, self.since = table, slot, state, time.monotonic()
        self.failed = False

    def __call__(self) -> bool:
        try:
            end_row(self.table, self.slot, self.state)
        except DONE:
            pass
        except Exception as exc:  # noqa: BLE001 -- a stalled lock holder, a table server gone quiet
            if not self.failed:
                self.failed = True
                log.warning("request-table slot %d: ending its row failed (%s); trying again until it "
                            "works", self.slot, exc)
            if time.monotonic() - self.since < GIVE_UP_S:
                return False
            log.warning("request-table slot %d: its row could not be ended for %g s (%s); left to the "
                        "table's recovery", self.slot, GIVE_UP_S, exc)
        return True


class _Retraction:
    """A failed insert's row released if it turns up; done once the server has said it is absent
    for RETRACT_WINDOW_S (or GIVE_UP_S passed without an answer)."""

    def __init__(self, table: RequestTable, record: RequestRecord) -> None:
        self.table, self.record, self.since = table, record, time.monotonic()
        self.absent_since: float | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        try:
            slot = self.table.find(self.record.request_id)
            if slot is None:
                self.absent_since = self.absent_since or now
                return now - self.absent_since >= RETRACT_WINDOW_S
            if self.table.get(slot).created_ns == self.record.created_ns:  # this admission's row
                end_row(self.table, slot, RequestState.FAILED)
                log.warning("request %s: released the row its failed admission left in the table",
                            self.record.request_id)
            return True  # released, or the row is another admission's of the same id
        except DONE:
            return True
        except Exception:  # noqa: BLE001 -- the server still away
            return now - self.since >= GIVE_UP_S
