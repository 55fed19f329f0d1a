"""The gateway's HTTP application (Starlette): OpenAI's routes over the proxy's gRPC API.

    POST /v1/chat/completions   POST /v1/completions     (stream or not; n choices)
    GET  /v1/models             GET  /health             GET /metrics
    POST /tokenize              POST /detokenize

The models are the proxy's, as its catalogue changes (catalogue.py); tokenization is the
proxy's too (its Tokenize and Detokenize RPCs), so the gateway reads no model files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenpool.protos.v1 import inference_pb2 as pb

from .catalogue import ModelCatalogue
from .choices import Choices
from .config import GatewayConfig
from .errors import APIError, from_rpc_error
from .generate_requests import (
    chat_requests,
    chat_tokenize_request,
    completion_requests,
    prompt_list,
    tokenize_messages,
)
from .metrics import GatewayMetrics
from .proxy_client import ProxyClient
from .responses import ChoiceState, ResponseBuilder
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode,
)
from .streaming import sse

log = logging.getLogger("tokenpool.gateway")
HEALTH_TIMEOUT_S = 2.0


class Gateway:
    """The routes' state: config, the proxy client, the proxy's model catalogue, metrics."""

    def __init__(self, config: GatewayConfig, client: ProxyClient, token: str | None = None) -> None:
        self.config = config
        self.client = client
        self.token = token  # clients must send "Authorization: Bearer <token>"; None: no check here
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        own = (("authorization", f"Bearer {token}"),) if token else ()
        self.catalogue = ModelCatalogue(client, self.metrics, own, config.retry_after_s)

    def app(self) -> Starlette:
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.list_models, methods=["GET"]),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        poll = asyncio.create_task(self.catalogue.poll(self.config.catalogue_refresh_s))
        try:
            yield
        finally:
            poll.cancel()
            await self.client.close()

    # -- completions ---------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._guarded(request, self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, self._completions)

    async def _chat(self, request: Request) -> Response:
        body = decode(await self._body(request), ChatCompletionRequest)
        await self.catalogue.require(body.model, self._metadata(request))
        tokenize = chat_tokenize_request(body, self.config)
        ids = (await self._proxy(self.client.tokenize(tokenize, self._metadata(request)), body.model,
                                 "messages")).ids
        builder = ResponseBuilder(True, body.model, body.num_logprobs is not None, body.n)
        return await self._generate(request, body, chat_requests(body, list(ids)), builder)

    async def _completions(self, request: Request) -> Response:
        body = decode(await self._body(request), CompletionRequest)
        await self.catalogue.require(body.model, self._metadata(request))
        requests = completion_requests(body, self.config)
        echo = await self._prompt_texts(request, body) if body.echo else None
        builder = ResponseBuilder(False, body.model, body.num_logprobs is not None, body.n, echo)
        return await self._generate(request, body, requests, builder)

    async def _prompt_texts(self, request: Request, body: CompletionRequest) -> list[str]:
        """Each choice's prompt as text, for echo: a text prompt as given, token ids decoded by the
        proxy (prompt-major, n a prompt, as completion_requests orders the choices)."""
        texts = []
        for prompt in prompt_list(body.prompt):
            if not isinstance(prompt, str):
                call = self.client.detokenize(pb.DetokenizeRequest(model=body.model, ids=prompt),
                                              self._metadata(request))
                prompt = (await self._proxy(call, body.model, "prompt")).text
            texts += [prompt] * body.n
        return texts

    async def _generate(self, request: Request, body, requests: list, builder: ResponseBuilder) -> Response:
        timers = [self.metrics.started(body.model) for _ in requests]
        choices = Choices(self.client, requests, self._metadata(request), self.config.retry_after_s)
        try:
            await _unless_disconnected(request, choices.start())
        except BaseException as exc:
            choices.cancel()
            for timer in timers:
                timer.ended("abort")
            if isinstance(exc, APIError) and exc.code == "model_not_found":
                self.catalogue.forget(body.model)  # removed since the catalogue's last listing
            raise
        if body.stream:
            return StreamingResponse(sse(choices, builder, body.include_usage, timers),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        states = await _unless_disconnected(request, _collect(choices, timers))
        return JSONResponse(builder.completion(states))

    # -- models, tokens, health, metrics ---------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        async def listing(request: Request) -> Response:
            found = await self._proxy(self.client.list_models(self._metadata(request)))
            self.catalogue.update(found.models)
            return JSONResponse({"object": "list", "data": [_model_card(m) for m in found.models]})
        return await self._guarded(request, listing)

    async def tokenize(self, request: Request) -> Response:
        async def run(request: Request) -> Response:
            body = decode(await self._body(request), TokenizeRequest)
            if (body.prompt is None) == (body.messages is None):
                raise APIError(400, "give exactly one of prompt and messages", param="prompt")
            await self.catalogue.require(body.model, self._metadata(request))
            if body.messages is not None:
                asked, param = tokenize_messages(body.model, body.messages), "messages"
            else:
                asked, param = pb.TokenizeRequest(model=body.model, text=body.prompt,
                                                  add_special_tokens=body.add_special_tokens), "prompt"
            call = self.client.tokenize(asked, self._metadata(request))
            answer = await self._proxy(call, body.model, param)
            return JSONResponse({"tokens": list(answer.ids), "count": len(answer.ids),
                                 "max_model_len": answer.max_context})
        return await self._guarded(request, run)

    async def detokenize(self, request: Request) -> Response:
        async def run(request: Request) -> Response:
            body = decode(await self._body(request), DetokenizeRequest)
            await self.catalogue.require(body.model, self._metadata(request))
            asked = pb.DetokenizeRequest(model=body.model, ids=body.tokens)
            answer = await self._proxy(self.client.detokenize(asked, self._metadata(request)), body.model,
                                       "tokens")
            return JSONResponse({"prompt": answer.text})
        return await self._guarded(request, run)

    async def health(self, request: Request) -> Response:
        """200 when the proxy answers its gRPC health check SERVING, else 503."""
        stub = health_pb2_grpc.HealthStub(self.client.channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            serving = answer.status == health_pb2.HealthCheckResponse.SERVING
        except Exception:  # unreachable, refused: not healthy, whatever the reason
            serving = False
        return Response(status_code=200 if serving else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- shared steps ------------------------------------------------------------------------------

    async def _guarded(self, request: Request, handler) -> Response:
        """The handler's response, or its APIError as OpenAI's JSON error."""
        try:
            self._authorize(request)
            return await handler(request)
        except APIError as exc:
            return exc.response()
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as exc:  # a gateway bug: logged, and still OpenAI's shape for the client
            log.exception("%s failed", request.url.path)
            return APIError(500, f"internal error: {exc!r}", code="internal_error").response()

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise APIError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 once it passes max_body_bytes (read no further)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _proxy(self, call, model: str | None = None, param: str | None = None):
        """A unary call's answer, or its status as an APIError: a bad value names param; NOT_FOUND
        drops the model from the catalogue (removed since the last listing)."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, self.config.retry_after_s)
        if error.code == "model_not_found" and model is not None:
            self.catalogue.forget(model)
        elif error.status == 400 and param is not None:
            error.param = param
        raise error

    @staticmethod
    def _metadata(request: Request) -> tuple:
        """The client's bearer token goes on to the proxy, which checks it too."""
        auth = request.headers.get("authorization")
        return (("authorization", auth),) if auth else ()


async def _collect(choices: Choices, timers) -> list[ChoiceState]:
    states = [ChoiceState() for _ in choices.calls]
    try:
        async for item in choices.events():
            if item.error is not None:
                raise item.error
            states[item.index].add(item.response)
            timers[item.index].tokens(len(item.response.token_ids), item.response)
    finally:
        choices.cancel()
        for timer, state in zip(timers, states, strict=True):
            timer.ended(state.finish_reason)
    return states


async def _unless_disconnected(request: Request, work):
    """Await work; if the client disconnects first, cancel it and raise ClientDisconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")


def _model_card(info) -> dict:
    return {"id": info.id, "object": "model", "created": 0, "owned_by": "tokenpool",
            "max_model_len": info.max_context, "architecture": info.architecture,
            "weight_bytes": info.weight_bytes, "state": info.state or "unknown",
            "resident_on": list(info.resident_on), "requests": info.requests}


