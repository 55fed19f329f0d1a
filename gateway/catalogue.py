"""ModelCatalogue: the proxy's models as the gateway last read them (ListModels).

The proxy is the one source of truth for which models exist: the admin API adds and removes
them while the stack runs. The gateway holds no model files. Prompts go to the proxy's
Tokenize RPC (chat messages through the model's template) and come back as token ids;
/detokenize is its Detokenize RPC; log-probabilities carry their token texts in the
GenerateResponse itself. Why not read the tokenizers here from the model folders:

- the gateway may run in another container or pod than the proxy and instances (compose,
  deploy/), with no view of their model volume, and the admin API's folders (ListCatalogue)
  are paths on the instances' machine, readable only with the admin token;
- one tokenizer and one chat template, the proxy's, means the gateway's prompt is exactly the
  prompt Generate would build (counts, limits and errors agree);
- the cost is one unary call per chat request (not per choice, never per streamed token);
  completions with a text prompt send the text in Generate itself, with no extra call.

This catalogue only answers "which ids exist" (404 in OpenAI's shape for others) and keeps the
per-model Prometheus series to those ids, so clients cannot grow the label set. It is refreshed
every refresh_s in the background, by every /v1/models listing, and on a request for an id it
does not hold: such a request waits for a ListModels call that started after it arrived, so a
model added just before is found. Those calls are coalesced (one in flight) and spaced at
least MIN_REFRESH_GAP_S apart, so a flood of unknown ids costs the proxy a bounded rate of
ListModels calls. A NOT_FOUND from the proxy (a model removed since the last refresh) drops the
id at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from tokenpool.protos.v1 import inference_pb2 as pb

from .errors import APIError, from_rpc_error
from .metrics import GatewayMetrics
from .proxy_client import ProxyClient

log = logging.getLogger("tokenpool.gateway")
MIN_REFRESH_GAP_S = 0.2
LISTED_IDS = 20  # ids a 404's message names at most


class ModelCatalogue:
    def __init__(self, client: ProxyClient, metrics: GatewayMetrics, metadata: tuple = (),
                 retry_after_s: int = 1) -> None:
        """metadata: what the gateway's own ListModels calls carry (its bearer token, if any)."""
        self.client = client
        self.metrics = metrics
        self.metadata = metadata
        self.retry_after_s = retry_after_s
        self.models: dict[str, pb.ModelInfo] = {}
        self._call: asyncio.Task | None = None
        self._call_started = float("-inf")

    def update(self, models) -> None:
        """A fresh ListModels answer: the ids, and the metrics' series and KV gauges, follow it."""
        self.models = {m.id: m for m in models}
        self.metrics.follow(self.models)
        self.metrics.set_kv_usage(models)

    def forget(self, model_id: str) -> None:
        """The proxy answered NOT_FOUND for it: gone until a listing shows it again."""
        if self.models.pop(model_id, None) is not None:
            self.metrics.follow(self.models)

    async def require(self, model_id: str, metadata: tuple) -> pb.ModelInfo:
        """The model's entry; an unknown id waits for a fresh listing, then 404 if still unknown.

        metadata: the client's (used for the listing when the gateway has no token of its own)."""
        found = self.models.get(model_id)
        if found is None:
            await self.refresh(self.metadata or metadata)
            found = self.models.get(model_id)
        if found is None:
            raise APIError(404, f"model {model_id!r} is not served here; models: {self._listing()}",
                           param="model", code="model_not_found")
        return found

    async def refresh(self, metadata: tuple) -> None:
        """Returns once a ListModels call started after this call has answered (APIError if it failed)."""
        arrived = time.monotonic()
        while True:
            call, started = self._call, self._call_started
            if call is not None and not call.done() and started < arrived:
                with contextlib.suppress(Exception):  # an older call: not fresh enough either way
                    await asyncio.shield(call)
                continue
            if call is None or call.done() and started < arrived:
                wait = started + MIN_REFRESH_GAP_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                self._call_started = time.monotonic()
                self._call = asyncio.create_task(self._list(metadata))
                self._call.add_done_callback(_retrieve)  # its waiters may all have gone
                continue
            try:
                await asyncio.shield(call)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, self.retry_after_s) from None
            return

    async def poll(self, every_s: float) -> None:
        """Refreshes every every_s until cancelled (failures are logged once each, then retried)."""
        failing = False
        while True:
            try:
                await self.refresh(self.metadata)
                failing = False
            except Exception as exc:  # the proxy may be starting, or want a token the gateway lacks
                if not failing:
                    log.warning("cannot list the proxy's models: %s", getattr(exc, "message", exc))
                failing = True
            await asyncio.sleep(every_s)

    async def _list(self, metadata: tuple) -> None:
        self.update((await self.client.list_models(metadata)).models)

    def _listing(self) -> str:
        ids = sorted(self.models)
        more = f" and {len(ids) - LISTED_IDS} more (GET /v1/models)" if len(ids) > LISTED_IDS else ""
        return (", ".join(ids[:LISTED_IDS]) or "none") + more


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
