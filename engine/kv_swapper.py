"""KVSwapper: moves a sequence's KV blocks between the device KV cache and the host KV pool, asynchronously.

    swap_out: kv[:, :, b] for b in block_ids  ->  new pool blocks   (handle.result() = pool offsets)
    swap_in:  pool blocks at offsets          ->  kv[:, :, b] for b in block_ids (any free device ids)

Each swap is one job on a small thread pool, so compute goes on while KV moves; the scheduler polls
handle.done() and runs the sequences whose KV has landed. On CUDA the job enqueues its copies on a
dedicated copy stream, ordered after the compute stream's work by an event recorded at call time,
and finishes when an event recorded after the copies completes.

Copies go block by block straight between the two layouts (~0.7x of a contiguous memcpy on the CPU):
gathering kv[:, :, ids] into one tensor first measured 3-4x slower, and one index_copy_ per swap-in
no faster (bench/kv_swap_bench.py compares them).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .host_kv_pool import HostKVPool
from .slab_allocator import BlockShape


class SwapHandle:
    """One swap in flight: done(), wait(), result() -> pool offsets; nbytes and seconds for counters;
    finished_at for schedulers that time what a turn waited for."""

    def __init__(self, direction: str, offsets: list[int], nbytes: int, future: Future) -> None:
        self.direction = direction  # "out" | "in"
        self.offsets = offsets  # pool blocks written (out) or read (in), in block_ids order
        self.nbytes = nbytes
        self.finished_at: float | None = None  # time.monotonic() once the copy ended (or failed)
        self._future = future
        future.add_done_callback(self._finished)

    def _finished(self, future: Future) -> None:
        self.finished_at = time.monotonic()

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy finished; re-raises its error (a failed swap-out freed its blocks)."""
        self._future.result(timeout)

    def result(self, timeout: float | None = None) -> list[int]:
        self.wait(timeout)
        return self.offsets

    @property
    def seconds(self) -> float:
        """Time the copy itself took (not the queueing before it); waits for the copy."""
        return self._future.result()

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class KVSwapper:
    """Asynchronous block copies between one or more device KV caches and a HostKVPool.

    Contracts: keep the device blocks of a swap-out unchanged until its handle is done; do not read
    the device blocks of a swap-in before its handle is done. Offsets of a swap still in flight
    cannot be swapped in or released (ValueError), so a pool block is never read while written.
    """

    def __init__(self, pool: HostKVPool, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.pool = pool
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kv-swap")
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()  # pool offsets some swap is copying to or from
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._closed = False

    def swap_out(self, kv: torch.Tensor, block_ids: list[int], shape: BlockShape) -> SwapHandle:
        """Copy kv[:, :, b] for b in block_ids into newly allocated pool blocks.

        kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] matching `shape`.
        The pool blocks are allocated now: KVPoolFullError is raised here, with nothing allocated.
        """
        self._check_open()
        _check_blocks(kv, block_ids, shape)
        offsets = self.pool.alloc(shape, len(block_ids))
        views = self.pool.block_views(offsets, shape)
        pairs = [(view, kv.select(2, b)) for view, b in zip(views, block_ids, strict=True)]
        return self._submit("out", offsets, pairs, shape, kv.device)

    def stage(self, blocks: list[torch.Tensor], shape: BlockShape) -> SwapHandle:
        """Copy blocks that live elsewhere (e.g. KV handed over by a prefill instance, each a tensor
        of shape.dims) into newly allocated pool blocks, as a swap-out would.

        Keep the source blocks unchanged until the handle is done. KVPoolFullError here, with
        nothing allocated, when the pool cannot take them.
        """
        self._check_open()
        bad = [tuple(b.shape) for b in blocks if tuple(b.shape) != shape.dims or b.dtype != shape.torch_dtype]
        if bad:
            raise ValueError(f"staged KV blocks must be {shape.dims} {shape.dtype}, got {bad[0]}")
        offsets = self.pool.alloc(shape, len(blocks))
        pairs = list(zip(self.pool.block_views(offsets, shape), blocks, strict=True))
        device = blocks[0].device if blocks else torch.device("cpu")
        return self._submit("out", offsets, pairs, shape, device)

    def swap_in(self, kv: torch.Tensor, offsets: list[int], block_ids: list[int],
                shape: BlockShape) -> SwapHandle:
        """Copy the pool blocks at `offsets` into kv[:, :, b] for b in block_ids (same order).

        The pool blocks stay allocated; release() them once the handle is done.
        """
        self._check_open()
        _check_blocks(kv, block_ids, shape)
        if len(offsets) != len(block_ids):
            raise ValueError(f"swap_in got {len(offsets)} pool offsets for {len(block_ids)} device blocks")
        self._check_settled(offsets)
        views = self.pool.block_views(offsets, shape)
        pairs = [(kv.select(2, b), view) for view, b in zip(views, block_ids, strict=True)]
        return self._submit("in", list(offsets), pairs, shape, kv.device)

    def release(self, offsets: Iterable[int]) -> None:
        """Free pool blocks (after their swap-in is done, or when the sequence is aborted)."""
        offsets = list(offsets)
        self._check_settled(offsets)
        self.pool.free(offsets)

    def close(self) -> None:
        """Finish the swaps in flight and stop the workers; the pool stays open."""
        self._closed = True
        self._executor.shutdown(wait=True)

    def __enter__(self) -> KVSwapper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _submit(self, direction: str, offsets: list[int], pairs: list, shape: BlockShape,
                device: torch.device) -> SwapHandle:
        with self._lock:
            self._in_flight.update(offsets)
        on_cuda = device.type == "cuda"
        job = self._cuda_job(pairs, device) if on_cuda else functools.partial(_copy_timed, pairs)
        future = self._executor.submit(job)
        future.add_done_callback(lambda f: self._settle(direction, offsets, f))
        return SwapHandle(direction, offsets, len(pairs) * shape.nbytes, future)

    def _settle(self, direction: str, offsets: list[int], future: Future) -> None:
        with self._lock:
            self._in_flight.difference_update(offsets)
        if direction == "out" and future.exception() is not None:
            self.pool.free(offsets)  # a failed swap-out leaves nothing allocated

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("KVSwapper is closed")

    def _check_settled(self, offsets: list[int]) -> None:
        with self._lock:
            busy = self._in_flight.intersection(offsets)
        if busy:
            raise ValueError(f"{len(busy)} pool blocks (e.g. offset {min(busy)}) are still being copied; "
                             "wait for their swap handle first")

    def _cuda_job(self, pairs: list, device: torch.device):
        """A job that copies on the device's copy stream after the compute work enqueued so far."""
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))  # KV written by compute up to this call

        def job() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # The cache outlives every swap, so its memory needs no record_stream on the copy stream.
            with torch.cuda.device(device), torch.cuda.stream(stream):
                stream.wait_event(ready)
                start.record(stream)
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)  # DMA when the pool is pinned
                end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return job


def _copy_timed(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Copy each (dst, src) pair; seconds taken. torch releases the GIL inside copy_."""
    start = time.perf_counter()
    for dst, src in pairs:
        dst.copy_(src)
    return time.perf_counter() - start


def _check_blocks(kv: torch.Tensor, block_ids: list[int], shape: BlockShape) -> None:
    """kv must be [num_layers, 2, num_blocks, *block dims] of shape's dtype; ids distinct and in range."""
    have = (*kv.shape[:2], *kv.shape[3:]) if kv.dim() == 6 else tuple(kv.shape)
    if have != shape.dims or kv.dtype != shape.torch_dtype:
        raise ValueError(f"KV cache {tuple(kv.shape)} {kv.dtype} does not hold blocks of {shape}")
    num_blocks = kv.shape[2]
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"device block ids {bad[:4]} outside the cache's {num_blocks} blocks")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("device block ids repeat")
