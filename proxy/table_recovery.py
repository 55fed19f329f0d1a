"""A restarted proxy's first job: the rows its dead predecessor left in the request table.

The table lives in shared memory and outlives a proxy killed without cleaning up. Its rows
are orphans: their clients' connections died with that proxy, and the instances, seeing
their calls cancelled, already dropped the prompts and the sequences. What can remain is KV
published to the hand-off pool and never adopted, and the rows themselves. reclaim_orphans
frees both for every row whose admitting proxy is no longer running (RequestRecord.proxy_pid);
nothing is dispatched again (nobody is waiting for it). Rows of live proxies (other workers
on the node) are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import grpc
from tokenpool.protos.internal.v1 import instances_pb2 as ipb

from .request_table import (
    ATTEMPT_MARK,
    CorruptSlotError,
    RequestRecord,
    RequestTable,
    SlotFreeError,
    TableLockTimeout,
)

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 5.0
RECLAIM_EVERY_S = 5.0


def process_alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the signal check
    return stat.rpartition(")")[2].split()[0] != "Z"


def orphans(table: RequestTable) -> list[tuple[int, RequestRecord | None]]:
    """(slot, record) of every row admitted by a proxy process that no longer runs, and (slot,
    None) for a row left half-written (its writer died mid-copy: no live process owns it)."""
    found = []
    for slot in range(table.usage().capacity):
        try:
            record = table.get(slot)
        except (SlotFreeError, TableLockTimeout):  # free, or mid-write by a stalled process: alive
            continue
        except CorruptSlotError:
            found.append((slot, None))
            continue
        if _orphaned(table, slot, record):
            found.append((slot, record))
    return found


def _orphaned(table: RequestTable, slot: int, record: RequestRecord) -> bool:
    alive = table.owner_alive(slot, record)
    if alive is not None:  # the table knows its owners (proxies on other hosts: pids mean nothing)
        return not alive
    return bool(record.proxy_pid) and record.proxy_pid != os.getpid() and not process_alive(record.proxy_pid)


async def reclaim_orphans(table: RequestTable, agents: list, attempts: int) -> int:
    """Free the hand-off KV of every orphaned row (the request and its re-dispatches, on each
    agent) and release the row -> how many rows were reclaimed."""
    reclaimed = 0
    remote = table.remote  # a Redis table: a round trip per slot, made off the event loop
    for slot, record in await asyncio.to_thread(orphans, table) if remote else orphans(table):
        base = [record.request_id] if record is not None else []
        ids = base + [f"{r}{ATTEMPT_MARK}{n}" for r in base for n in range(1, attempts)]
        for agent in agents:
            for request_id in ids:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await agent.ReleaseAll(ipb.RequestRef(request_id=request_id), timeout=RELEASE_TIMEOUT_S)
        with contextlib.suppress(SlotFreeError, TableLockTimeout):  # locked by a stalled process: next round
            await asyncio.to_thread(table.release, slot) if remote else table.release(slot)
            reclaimed += 1
    if reclaimed:
        log.warning("reclaimed %d requests left in the table by a proxy that died", reclaimed)
    return reclaimed


async def reclaim_forever(table: RequestTable, agents: list, attempts: int,
                          every_s: float = RECLAIM_EVERY_S) -> None:
    """For a table shared by several proxies (Redis): every `every_s`, reclaim the rows of any
    proxy that died, so the survivors' capacity comes back without a restart. Runs until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await reclaim_orphans(table, agents, attempts)
        except Exception as e:  # noqa: BLE001 -- e.g. the table's server unreachable a moment: next round
            log.warning("reclaiming orphaned rows failed: %s", e)
