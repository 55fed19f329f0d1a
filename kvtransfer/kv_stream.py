"""KVStream: one sequence's KV published layer by layer while its prefill is still computing.

    engine thread (forward pass)           copy thread (this stream's)
    layer i done -> put(i, blocks)  ---->  copy layer i of those blocks into the pool blocks
    layer i+1 computes ...                 cross-node: Push the layers copied so far (NIXL WRITE)
    prefill done -> finish(n)       ---->  drain, MarkReady -> the handle (on the destination)

torch's copies release the GIL, so layer i's copy overlaps layer i+1's compute; when pushes fall
behind the layers, the layers queued meanwhile go in one Push. Copies and pushes run in put order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from .handle import KVHandleInfo

_DONE = None


class KVStream:
    """The publishing side of one handle (its blocks allocated, not ready); put() from one thread.

    push: (handle, layer_start, layer_end, block_start, block_end) -> None, or None for a
    node-local handle; mark_ready: (handle, num_tokens) -> the handle to pass on; release: (handle)
    -> None, best effort.
    """

    def __init__(self, handle: KVHandleInfo, views: list[torch.Tensor],
                 push: Callable[..., None] | None, mark_ready: Callable[[KVHandleInfo, int], KVHandleInfo],
                 release: Callable[[KVHandleInfo], None]) -> None:
        self.handle = handle
        self._views = views  # the pool blocks: [num_layers, 2, block_size, kv_heads, head_dim] each
        self._push = push
        self._mark_ready = mark_ready
        self._release = release
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._run, name=f"kv-stream-{handle.handle_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def put(self, layer: int, first_block: int, kv_layer: torch.Tensor, block_ids: list[int]) -> None:
        """Layer `layer` of the sequence's blocks first_block.. is computed: it is in
        kv_layer[:, block_ids[j]] ([2, block_size, kv_heads, head_dim] each), unchanged from now on."""
        if self._error is None and not self._ended:
            self._queue.put((layer, first_block, kv_layer, tuple(block_ids)))

    def finish(self, num_tokens: int) -> KVHandleInfo:
        """Every layer of every block put: wait for the copies (and pushes), mark the handle ready
        -> the handle for the decode side. On failure the blocks are released and it raises."""
        self._end()
        try:
            if self._error is not None:
                raise self._error
            return self._mark_ready(self.handle, num_tokens)
        except BaseException:
            self._release(self.handle)
            raise

    def abort(self) -> None:
        """Stop and release the blocks (the prefill was dropped or failed)."""
        self._end()
        self._release(self.handle)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._queue.put(_DONE)
        self._thread.join()

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            done = batch[-1] is _DONE
            items = [item for item in batch if item is not _DONE]
            if items and self._error is None:
                try:
                    self._copy_and_push(items)
                except BaseException as exc:  # noqa: BLE001 - finish() raises it on the engine thread
                    self._error = exc

    def _copy_and_push(self, items: list[tuple]) -> None:
        for layer, first, kv_layer, block_ids in items:
            for j, block in enumerate(block_ids):
                self._views[first + j][layer].copy_(kv_layer[:, block])
        if self._push is not None:
            for layer_start, layer_end, first, count in _runs(items):
                self._push(self.handle, layer_start, layer_end, first, first + count)


def _runs(items: list[tuple]) -> list[tuple[int, int, int, int]]:
    """(layer_start, layer_end, first_block, num_blocks) of runs of consecutive layers, same blocks."""
    runs: list[list[int]] = []
    for layer, first, _, block_ids in items:
        if runs and runs[-1][1] == layer and runs[-1][2:] == [first, len(block_ids)]:
            runs[-1][1] = layer + 1
        else:
            runs.append([layer, layer + 1, first, len(block_ids)])
    return [tuple(run) for run in runs]
