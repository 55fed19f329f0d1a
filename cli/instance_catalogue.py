"""The Catalogue RPC both instance services answer: the proxy's admin calls, run on the engine thread.

    add      register a folder lazily (engine/model_catalogue.py) and give it a timing profile:
             the cached profile of its shape, else measured now, once (it loads the model)
    remove   refuse while the instance holds requests for it; move it out of the arena slots
             (switching to another model) and forget it
    evict    drop its host-cache copy (node-wide; already gone is no error)
    preload  start its disk load; the claim is held until the load ends
    list     every catalogue model with its tier

Refusals carry the gRPC status the admin service passes on (INVALID_ARGUMENT, NOT_FOUND,
ALREADY_EXISTS, FAILED_PRECONDITION), and change nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
from tokenpool.engine.cold_loader import LoadTicket
from tokenpool.engine.model_catalogue import CatalogueEntry, CatalogueError, ModelCatalogue, check_model_id
from tokenpool.engine.multi_model_engine import MultiModelEngine
from tokenpool.engine.step_profiler import InstanceTimings, cached_profile, kv_swap_for
from tokenpool.protos.internal.v1 import instances_pb2 as ipb

ACTIONS = ("add", "remove", "evict", "preload", "list")
QueuedFn = Callable[[MultiModelEngine], dict[str, int]]  # requests taken, not yet in the engine


class Refused(Exception):
    """A catalogue call refused with this status; nothing changed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class InstanceCatalogue:
    def __init__(self, name: str, timings: InstanceTimings | None, queued: QueuedFn | None = None) -> None:
        self.name = name
        self.timings = timings
        self.queued = queued
        self._preloads: list[LoadTicket] = []
        self.added_at_run_time: set[str] = set()  # through "add", not from the flags (engine thread)

    async def answer(self, worker, request: ipb.CatalogueRequest, context) -> ipb.CatalogueReply:
        """The RPC: the request run on the worker's engine thread, a refusal as its status."""
        try:
            return await asyncio.wrap_future(worker.post(lambda e: self.run(e, request)))
        except Refused as exc:
            await context.abort(exc.code, f"{self.name}: {exc}")

    def run(self, engine: MultiModelEngine, request: ipb.CatalogueRequest) -> ipb.CatalogueReply:
        """Engine thread."""
        if request.action not in ACTIONS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"action {request.action!r} is not one of {', '.join(ACTIONS)}")
        self._drop_finished_preloads()
        catalogue = ModelCatalogue(engine)
        if request.action == "list":
            return ipb.CatalogueReply(models=[self._to_pb(e) for e in catalogue.entries()])
        if request.action == "add":
            return self._add(engine, catalogue, request.model, request.folder)
        _known(engine, request.model)
        if request.action == "remove":
            self._remove(engine, catalogue, request.model)
            return ipb.CatalogueReply()
        if request.action == "evict":
            _evict(engine, catalogue, request.model)
        else:
            self._preload(catalogue, request.model)
        return ipb.CatalogueReply(models=[self._to_pb(catalogue.entry(request.model))])

    def _add(self, engine: MultiModelEngine, catalogue: ModelCatalogue, model_id: str,
             folder: str) -> ipb.CatalogueReply:
        try:
            check_model_id(model_id)
        except CatalogueError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if model_id in engine.models:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"model id {model_id!r} is already served")
        try:
            entry = catalogue.add(model_id, Path(folder))
        except CatalogueError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.added_at_run_time.add(model_id)
        reply = ipb.CatalogueReply(models=[self._to_pb(entry)])
        if self.timings is not None:
            try:  # a shape seen before: the cached profile; a new one: measured now, once
                self.timings.profiles[model_id] = t = cached_profile(engine, model_id)
                if self.timings.kv_swap:  # a decode instance's: the measured rate, this model's blocks
                    rates = next(iter(self.timings.kv_swap.values()))
                    self.timings.kv_swap[model_id] = kv_swap_for(rates, engine, model_id)
            except Exception as exc:  # noqa: BLE001 - reported as the refusal; nothing stays registered
                _vacate(engine, model_id)
                catalogue.remove(model_id)
                self.added_at_run_time.discard(model_id)
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"model {model_id!r} could not be "
                              f"profiled: {exc}") from None
            reply.timing.CopyFrom(ipb.ModelTiming(
                model=model_id, prefill_a=t.prefill.a, prefill_b=t.prefill.b, step_a=t.decode.a,
                step_b=t.decode.b, step_c=t.decode.c, switch_s=self.timings.switch_seconds(model_id)))
        return reply

    def _remove(self, engine: MultiModelEngine, catalogue: ModelCatalogue, model_id: str) -> None:
        held = engine.num_requests(model_id) + (self.queued(engine).get(model_id, 0) if self.queued else 0)
        if held or engine.has_unfinished(model_id):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"model {model_id!r} has {max(held, 1)} requests in flight; retry once they end")
        _vacate(engine, model_id)
        try:
            catalogue.remove(model_id)
        except CatalogueError as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        self.added_at_run_time.discard(model_id)
        if self.timings is not None:
            self.timings.profiles.pop(model_id, None)
            self.timings.kv_swap.pop(model_id, None)

    def _to_pb(self, entry: CatalogueEntry) -> ipb.CatalogueModel:
        model = _to_pb(entry)
        model.added_at_run_time = entry.model_id in self.added_at_run_time
        return model

    def _preload(self, catalogue: ModelCatalogue, model_id: str) -> None:
        ticket = catalogue.preload(model_id)
        if ticket is not None:
            self._preloads.append(ticket)  # held: the last claim to go would abandon the load

    def _drop_finished_preloads(self) -> None:
        for ticket in [t for t in self._preloads if t.done()]:
            ticket.cancel()
            self._preloads.remove(ticket)


def _known(engine: MultiModelEngine, model_id: str) -> None:
    if model_id not in engine.models:
        raise Refused(grpc.StatusCode.NOT_FOUND, f"model {model_id!r} is not served "
                      f"({len(engine.models)} models are)")


def _evict(engine: MultiModelEngine, catalogue: ModelCatalogue, model_id: str) -> None:
    if not engine.cache.contains(model_id):
        return  # the host cache is the node's: another instance's call may have dropped it already
    try:
        catalogue.evict(model_id)
    except CatalogueError as exc:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None


def _vacate(engine: MultiModelEngine, model_id: str) -> None:
    """Move model_id out of both arena slots: switch to another model if it is active, and empty
    the free slot if it holds it."""
    if engine.active == model_id:
        others = sorted((m for m in engine.models if m != model_id),
                        key=lambda m: not engine.cache.contains(m))  # cached first: no disk read
        if not others:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"model {model_id!r} is the only model served; nothing can take its slot")
        engine.switch_to(others[0])
    engine.switcher.discard(model_id)


def _to_pb(entry: CatalogueEntry) -> ipb.CatalogueModel:
    return ipb.CatalogueModel(id=entry.model_id, folder=str(entry.folder), tier=entry.tier.value,
                              weight_bytes=entry.weight_bytes, requests=entry.unfinished,
                              loaded_bytes=entry.loaded_bytes or 0, loading=entry.loaded_bytes is not None,
                              waiting_for_room=entry.waiting_for_room)
