"""NixlLink: a kvtransfer agent's NIXL data plane — its pool registered with UCX, its peers, WRITEs.

    agent A (sender)                                         agent B (receiver)
    Connect(A's AgentInfo)  ------------- gRPC ------------>  add_peer(A's metadata)
    add_peer(B's metadata)  <------------ B's AgentInfo ----
    write(B, spans, notif)  ======= NIXL WRITE (UCX) =====>  B's pool;  notifs() -> {A: [notif]}

The sender drives (a push): it knows when each layer of a prefill has landed in its pool, so it
can move that layer at once, while the receiver learns of progress from notifications. Spans are
(local offset, remote offset, length) in bytes; each is checked against this pool and the peer's
advertised pool size before a descriptor is built here from it. Nothing NIXL serializes (its
descriptor lists are pickles) ever crosses a process boundary: only metadata bytes and offsets.

Not thread-safe: the agent calls it from its event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

POLL_S = 0.0005  # how often a transfer in flight is checked
PAGE_BYTES = 4096
UCX_PARAMS = {"ucx_error_handling_mode": "none"}  # shared-memory transports (cma, posix) need it
# No progress thread: NIXL's spins (a core at 100% per agent, measured); the agent makes progress
# when it polls its transfers and notifications instead.
AGENT_CONFIG = {"backends": [], "enable_prog_thread": False}


class TransferFailedError(RuntimeError):
    """NIXL reported an error for a transfer (the peer is gone, or its memory is)."""


class TransferTimeoutError(TimeoutError):
    """A transfer did not complete in time; it was cancelled."""


@dataclass(frozen=True)
class PeerRegion:
    """A registered peer's pool as it advertised it: base address in its process, size."""

    name: str
    address: int
    nbytes: int


class NixlLink:
    """One NIXL agent named `name` over `buffer` (a contiguous 1-D uint8 host tensor, the pool)."""

    def __init__(self, name: str, buffer: torch.Tensor) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(f"the pool buffer must be a contiguous 1-D uint8 tensor, got {buffer.dtype} "
                             f"{tuple(buffer.shape)}")
        from nixl._api import nixl_agent, nixl_agent_config  # heavy and optional: only when enabled

        self.name = name
        self._buffer = buffer  # kept alive while registered
        # Fault every page in now: a first-touch fault inside a transfer (in either process's
        # page tables) costs more than the copy of that page.
        buffer[::PAGE_BYTES].zero_()
        self._agent = nixl_agent(name, nixl_agent_config(**AGENT_CONFIG))
        self._agent.create_backend("UCX", UCX_PARAMS)
        self._registered = self._agent.register_memory(buffer)
        self.address = buffer.data_ptr()
        self.nbytes = buffer.numel()
        self.peers: dict[str, PeerRegion] = {}

    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def add_peer(self, region: PeerRegion, metadata: bytes) -> None:
        """Load a peer's metadata; ValueError if it names another agent than `region.name`."""
        try:
            loaded = self._agent.add_remote_agent(metadata)
        except Exception as exc:  # noqa: BLE001 - NIXL raises one class per status
            raise ValueError(f"peer {region.name}'s NIXL metadata cannot be loaded: {type(exc).__name__}: "
                             f"{exc}") from None
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != region.name:
            self._agent.remove_remote_agent(loaded)
            raise ValueError(f"peer metadata names agent {loaded!r}, not {region.name!r}")
        self.peers[region.name] = region

    def remove_peer(self, name: str) -> None:
        if self.peers.pop(name, None) is not None:
            self._agent.remove_remote_agent(name)

    def notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sending agent."""
        return self._agent.get_new_notifs()

    async def write(self, peer: str, spans: Sequence[tuple[int, int, int]], notif: bytes,
                    timeout_s: float) -> float:
        """WRITE each (local offset, remote offset, length) to peer, then notify it -> seconds taken.

        ValueError (nothing moved) for an unknown peer or a span outside either pool;
        TransferFailedError when NIXL reports an error; TransferTimeoutError after timeout_s.
        """
        local, remote = self._descs(peer, spans)
        start = time.perf_counter()
        handle = self._nixl(peer, self._agent.initialize_xfer, "WRITE", local, remote, peer, notif)
        try:
            state = self._nixl(peer, self._agent.transfer, handle)
            while state == "PROC":
                if time.perf_counter() - start > timeout_s:
                    raise TransferTimeoutError(f"NIXL WRITE of {len(spans)} spans to {peer} not done "
                                               f"after {timeout_s:.1f} s")
                await asyncio.sleep(POLL_S)
                state = self._nixl(peer, self._agent.check_xfer_state, handle)
            if state != "DONE":
                raise TransferFailedError(f"NIXL WRITE of {len(spans)} spans to {peer} failed ({state})")
            return time.perf_counter() - start
        finally:
            try:
                self._agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001 - a transfer that cannot be cancelled is leaked, not fatal
                pass

    @staticmethod
    def _nixl(peer: str, call, *args):
        """call(*args); NIXL's own errors (e.g. nixlRemoteDisconnectError) as TransferFailedError."""
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 - the bindings raise one class per NIXL status
            raise TransferFailedError(f"NIXL WRITE to {peer} failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        for name in list(self.peers):
            self.remove_peer(name)
        self._agent.deregister_memory(self._registered)

    def _descs(self, peer: str, spans: Sequence[tuple[int, int, int]]):
        region = self.peers.get(peer)
        if region is None:
            raise ValueError(f"agent {peer!r} is not a registered peer of {self.name}")
        if not spans:
            raise ValueError("a transfer needs at least one span")
        here = np.empty((len(spans), 3), dtype=np.uint64)  # rows of (address, length, device 0)
        there = np.empty((len(spans), 3), dtype=np.uint64)
        for i, (local, remote, length) in enumerate(spans):
            _check_span(local, length, self.nbytes, "local")
            _check_span(remote, length, region.nbytes, f"{peer}'s")
            here[i] = (self.address + local, length, 0)
            there[i] = (region.address + remote, length, 0)
        return self._agent.get_xfer_descs(here, "DRAM"), self._agent.get_xfer_descs(there, "DRAM")


def _check_span(offset: int, length: int, nbytes: int, which: str) -> None:
    if offset < 0 or length <= 0 or offset + length > nbytes:
        raise ValueError(f"span at offset {offset} of {length} bytes does not lie in the {which} pool "
                         f"of {nbytes} bytes")


def merge_spans(spans: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent spans (contiguous on both sides) joined: fewer, larger descriptors move faster."""
    merged: list[tuple[int, int, int]] = []
    for local, remote, length in spans:
        if merged:
            last_local, last_remote, last_length = merged[-1]
            if last_local + last_length == local and last_remote + last_length == remote:
                merged[-1] = (last_local, last_remote, last_length + length)
                continue
        merged.append((local, remote, length))
    return merged
