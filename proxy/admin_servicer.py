"""AdminServicer: tokenpool.v1.Admin, the model catalogue changed while the stack runs.

Every call is checked against the admin token first (cli/admin_token.py). Changes fan out to
every prefill and decode instance in service through their internal Catalogue RPC and take
effect at the proxy (served models, dispatch timings, metrics series) only once every one agreed;
an instance that refuses rolls the others back, so no model is left half-registered. An instance
out of service (lost: killed, hung, partitioned) is left out, and brought in step by sync() before
it takes work again, as is one that was restarted from its flags meanwhile. A proxy that starts
while instances run (restarted) takes the catalogue they hold, run-time changes included (adopt).
Host-cache
operations (evict, preload) go to one instance per node (--node): the cache is the node's.

Removal refuses while requests for the model are in flight (FAILED_PRECONDITION naming the
count): it does not drain. The model stops being served at the proxy for the duration of the
call, so no new request slips in between the check and the instances' removal.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
from tokenpool.cli.admin_token import AdminGuard
from tokenpool.engine.model_catalogue import CatalogueError, check_model_id
from tokenpool.protos.internal.v1 import instances_pb2 as ipb
from tokenpool.protos.v1 import admin_pb2 as apb
from tokenpool.protos.v1 import admin_pb2_grpc

from .dispatcher import Timing
from .served_model import ServedModel, served_model_from_folder
from .shared_catalogue import POLL_S, RedisCatalogue, fingerprint

ADD_TIMEOUT_S = 300.0  # a model of a new shape is profiled on each instance while it is added
CALL_TIMEOUT_S = 60.0
ADOPT_TIMEOUT_S = 10.0  # at start-up: an instance that does not answer by then is synced when it does

log = logging.getLogger(__name__)


class AdminRefusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, backend, models: dict[str, ServedModel], folders: dict[str, Path], guard: AdminGuard,
                 metrics=None, dtype: str = "auto", shared: RedisCatalogue | None = None) -> None:
        """backend: the FleetBackend; models: the servicer's served-model map, changed in place;
        folders: each served model's folder (a removal that must be undone adds it back); shared:
        the catalogue the proxies of a Redis table share (shared_catalogue.py), or None."""
        self.backend = backend
        self.models = models
        self._folders = dict(folders)
        self.guard = guard
        self.metrics = metrics
        self.dtype = dtype
        self._lock = asyncio.Lock()  # one catalogue change (or sync) at a time
        self.shared = shared
        self._shared_version = 0  # of the shared catalogue, as last served here
        self._flags = {m: str(f) for m, f in folders.items()}  # the start-up catalogue
        backend.on_rejoin = self.sync

    async def AddModel(self, request, context):
        return await self._call(context, self._add, request.id, request.folder)

    async def RemoveModel(self, request, context):
        return await self._call(context, self._remove, request.id)

    async def EvictModel(self, request, context):
        return await self._call(context, self._on_cache, "evict", request.id)

    async def PreloadModel(self, request, context):
        return await self._call(context, self._on_cache, "preload", request.id)

    async def ListCatalogue(self, request, context):
        return await self._call(context, self._list)

    async def _call(self, context, fn, *args):
        refusal = self.guard.refusal(context.invocation_metadata())
        if refusal is not None:
            await context.abort(*refusal)
        try:
            async with self._lock:
                return await fn(*args)
        except AdminRefusal as exc:
            await context.abort(exc.code, str(exc))

    # -- the operations ---------------------------------------------------------------------------

    async def _add(self, model_id: str, folder: str) -> apb.AdminReply:
        served = self._check_new(model_id, folder)
        request = ipb.CatalogueRequest(action="add", model=model_id, folder=str(served[1]))
        await self._share("put", model_id, str(served[1]))  # first: other proxies' syncs add it too
        try:
            named = await self._fan_out(request, ADD_TIMEOUT_S, undo=ipb.CatalogueRequest(action="remove",
                                                                                           model=model_id))
        except AdminRefusal:
            await self._share("drop", model_id, undoing=True)
            raise
        self._start_serving(model_id, *served)
        t = next((r.timing for _, r in named if r.timing.model), None)  # a prefill instance's profile
        if t is not None:
            self.backend.dispatcher.timings[model_id] = Timing(t.prefill_a, t.prefill_b, t.switch_s)
        entry = _merge(model_id, named)
        message = (f"added {model_id} from {served[1]} on {len(named)} instances "
                   f"({entry.weight_bytes / 2**20:.1f} MiB, tier {entry.tier}){self._out_of_service()}")
        return apb.AdminReply(message=message, model=entry)

    def _check_new(self, model_id: str, folder: str) -> tuple[ServedModel, Path]:
        try:
            check_model_id(model_id)
        except CatalogueError as exc:
            raise AdminRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"id: {exc}") from None
        if model_id in self.models:
            raise AdminRefusal(grpc.StatusCode.ALREADY_EXISTS, f"id: model {model_id!r} is already served")
        if self.backend.dispatcher.pins_instances:
            raise AdminRefusal(grpc.StatusCode.FAILED_PRECONDITION, "the static policy pins each model to "
                               "its own instances; the catalogue changes only under aegaeon or request")
        path = Path(folder)
        if not folder or not path.is_absolute():
            raise AdminRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"folder: {folder!r} must be an absolute "
                               "path on the instances' machine")
        if not (path / "config.json").is_file():
            raise AdminRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"folder: {folder} is not a model folder "
                               "(no config.json)")
        try:
            return served_model_from_folder(model_id, path, self.dtype), path
        except (OSError, ValueError, KeyError) as exc:
            raise AdminRefusal(grpc.StatusCode.INVALID_ARGUMENT, f"folder: {folder}: {exc}") from None

    async def _remove(self, model_id: str) -> apb.AdminReply:
        served = self._known(model_id)
        in_flight = self.backend.in_flight(model_id)
        if in_flight:
            raise AdminRefusal(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {model_id!r} has {in_flight} requests in flight; remove it once "
                               f"they end (nothing was changed)")
        del self.models[model_id]  # no new request from here on
        folder = str(self._folder_of(model_id))
        try:
            await self._share("drop", model_id)
            undo = ipb.CatalogueRequest(action="add", model=model_id, folder=folder)
            named = await self._fan_out(ipb.CatalogueRequest(action="remove", model=model_id), CALL_TIMEOUT_S,
                                        undo=undo)
        except AdminRefusal:
            self.models[model_id] = served
            await self._share("put", model_id, folder, undoing=True)
            raise
        self._stop_serving(model_id)
        message = f"removed {model_id} from {len(named)} instances{self._out_of_service()}"
        return apb.AdminReply(message=message)

    async def _on_cache(self, action: str, model_id: str) -> apb.AdminReply:
        """evict or preload on every node's host cache, through one instance of each."""
        self._known(model_id)
        per_node = self._one_per_node()
        request = ipb.CatalogueRequest(action=action, model=model_id)
        results = await asyncio.gather(*(self._one(i, request, CALL_TIMEOUT_S) for i in per_node.values()),
                                       return_exceptions=True)
        done = [n for n, r in zip(per_node, results, strict=True) if not isinstance(r, BaseException)]
        for node, result in zip(per_node, results, strict=True):
            if isinstance(result, AdminRefusal):
                where = f"node {node}: " if len(per_node) > 1 else ""
                also = f" ({action} done on {', '.join(map(str, done))})" if done else ""
                raise AdminRefusal(result.code, f"{where}{result}{also}")
            if isinstance(result, BaseException):
                raise AdminRefusal(grpc.StatusCode.INTERNAL, f"{action} {model_id}: {result}")
        entry = _merge(model_id, [(i.name, r) for i, r in zip(per_node.values(), results, strict=True)])
        nodes = f" on {len(per_node)} nodes" if len(per_node) > 1 else ""
        done = {"evict": f"evicted {model_id} from the host cache{nodes} (tier {entry.tier})",
                "preload": f"preloading {model_id}{nodes}: tier {entry.tier}"
                           + (f", {entry.loaded_bytes / 2**20:.1f}/{entry.weight_bytes / 2**20:.1f} MiB read"
                              if entry.loading else "")}
        return apb.AdminReply(message=done[action], model=entry)

    async def _list(self) -> apb.ListCatalogueResponse:
        named = await self._fan_out(ipb.CatalogueRequest(action="list"), CALL_TIMEOUT_S)
        return apb.ListCatalogueResponse(models=[_merge(m, named) for m in sorted(self.models)])

    async def sync(self, instance) -> bool:
        """Bring an instance that answers again in step with the served models (FleetBackend calls it
        before the instance takes work again) -> whether it is: models added while it was out are
        added, models removed are removed."""
        async with self._lock:
            try:
                await self._refresh()  # another proxy's latest changes, if the catalogue is shared
                reply = await self._one(instance, ipb.CatalogueRequest(action="list"), CALL_TIMEOUT_S)
                added, removed = await self._in_step(instance, reply)
            except AdminRefusal as exc:
                log.warning("instance %s answers again but its catalogue could not be brought in step "
                            "(%s); it stays out of service, tried again at the next health check",
                            instance.name, exc)
                return False
        if added or removed:
            log.warning("instance %s answers again: added %s, removed %s (catalogue changes made while "
                        "it was out of service)", instance.name, added or "none", removed or "none")
        return True

    async def adopt(self) -> None:
        """At start-up, before serving: the fleet's catalogue, run-time changes included, not only
        this proxy's flags. A restarted proxy (`tokenpool up`, Kubernetes) would otherwise not serve
        the models added at run time, and remove them from every instance that rejoins. The fleet's
        catalogue is the one the proxies share, where they do and it grew from the same flags (a
        proxy restarted, or one more started); else the flags plus what answering instances hold
        as added at run time (a model removed at run time comes back if the flags name it: the
        flags are the configuration). With no instance answering (a fresh stack whose instances
        start later), the flags stand. The answering instances are brought in step with it (one that
        refuses is out of service until it is); one that does not answer now is when it does (sync)."""
        if self.backend.dispatcher.pins_instances:
            return  # the static policy's catalogue never changes at run time
        async with self._lock:
            held = await self._held_by_instances()
            base = fingerprint(self._flags)
            version, shared_base, folders = (await asyncio.to_thread(self.shared.read) if self.shared
                                             else (0, "", {}))
            taken = version and shared_base == base
            if not taken:
                added = {m.id: m.folder for _, r in held for m in r.models if m.added_at_run_time}
                folders = {**self._flags, **added}
            adopted, dropped = self._serve_exactly(folders)
            if self.shared is not None and not taken:  # the first proxy of a fleet, or of new flags
                version = await asyncio.to_thread(self.shared.replace, self._served_folders(), base)
            self._shared_version = version
            for instance, reply in held:
                try:
                    await self._in_step(instance, reply)
                except AdminRefusal as exc:
                    self.backend.mark_lost(instance, f"its catalogue could not be brought in step ({exc}); "
                                                     f"tried again at each health check")
            self._set_aside_unanswered(held)
        if adopted or dropped:
            source = "the catalogue shared with the other proxies" if taken else f"{len(held)} instances"
            log.warning("catalogue taken from %s: serving %s, added at run time; not serving %s, removed at "
                        "run time", source, adopted or "none", dropped or "none")

    def _set_aside_unanswered(self, held: list[tuple[object, ipb.CatalogueReply]]) -> None:
        """An instance that did not answer adopt() comes up from its flags: while the served
        catalogue differs from them (in its ids or their folders) it would take requests for models
        it lacks or holds from another folder, so it stays out of service until sync() has brought
        it in step."""
        if set(self.models) == set(self._flags) and not self._moved(self._flags):
            return
        answered = {instance.name for instance, _ in held}
        for instance in self._instances():
            if instance.name not in answered:
                self.backend.mark_lost(instance, "it did not answer at the proxy's start while the catalogue "
                                                 "differs from the flags; brought in step when it answers")

    async def _held_by_instances(self) -> list[tuple[object, ipb.CatalogueReply]]:
        """(instance, its catalogue) for each instance that answers within ADOPT_TIMEOUT_S."""
        instances, listing = self._instances(), ipb.CatalogueRequest(action="list")
        replies = await asyncio.gather(*(self._one(i, listing, ADOPT_TIMEOUT_S) for i in instances),
                                       return_exceptions=True)
        return [(i, r) for i, r in zip(instances, replies, strict=True) if not isinstance(r, Exception)]

    def _served_folders(self) -> dict[str, str]:
        return {m: str(self._folders[m]) for m in self.models}

    async def follow(self) -> None:
        """Forever, with a shared catalogue: serve what another proxy's change made it, looking every
        POLL_S (its instances were changed by that proxy; this one only starts or stops serving)."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                if await asyncio.to_thread(self.shared.version) != self._shared_version:
                    async with self._lock:
                        await self._refresh()
            except Exception as exc:  # noqa: BLE001 - Redis away: serve on what we have, look again
                log.warning("the shared catalogue could not be read (%s); serving the models as they were",
                            exc)

    async def _refresh(self) -> None:
        """Serve exactly the shared catalogue, if there is one and it changed since we last did."""
        if self.shared is None:
            return
        version, _, folders = await asyncio.to_thread(self.shared.read)
        if version == self._shared_version or not version:  # not version: Redis lost it (restarted
            return  # empty, which fences every proxy of the table): serve on what we have
        self._shared_version = version
        adopted, dropped = self._serve_exactly(folders)
        if adopted or dropped:
            log.warning("catalogue changed through another proxy: serving %s, no longer %s",
                        adopted or "none", dropped or "none")

    async def _share(self, action: str, model_id: str, folder: str = "", undoing: bool = False) -> None:
        """Write a change into the shared catalogue (none: nothing to do). A failure refuses the
        change before anything else moved, or, undoing a change that failed, is logged."""
        if self.shared is None:
            return
        try:
            if action == "put":
                await asyncio.to_thread(self.shared.put, model_id, folder)
            else:
                await asyncio.to_thread(self.shared.drop, model_id)
        except Exception as exc:  # noqa: BLE001 - redis' errors, and OSError
            if undoing:
                log.error("undoing %s %s in the shared catalogue failed: %s", action, model_id, exc)
                return
            raise AdminRefusal(grpc.StatusCode.UNAVAILABLE, f"the catalogue shared with the other proxies "
                               f"(Redis) could not be written: {exc}; nothing was changed") from None

    def _serve_exactly(self, folders: dict[str, str]) -> tuple[list[str], list[str]]:
        """Serve the models in folders (id -> folder) and no others -> (started, stopped). An id served
        from another folder (removed and added again elsewhere) is served again from its new one."""
        dropped = sorted(set(self.models) - set(folders))
        moved = self._moved(folders)
        for model_id in dropped + moved:
            self._stop_serving(model_id)
        adopted = [m for m in sorted(set(folders) - set(self.models)) if self._serve_held(m, folders[m])]
        return adopted, dropped

    async def _in_step(self, instance, reply: ipb.CatalogueReply) -> tuple[list[str], list[str]]:
        """Add to and remove from an instance (whose catalogue reply is `reply`) what makes it hold
        exactly the served models, each from its served folder -> (added, removed); AdminRefusal if
        it refuses. An id it holds from another folder (one of its flags, removed and added again
        elsewhere while it was out) is removed and added again."""
        have = {m.id: m.folder for m in reply.models}
        moved = self._moved(have)
        new, gone = sorted(set(self.models) - set(have)), sorted(set(have) - set(self.models))
        for model_id in new:  # first: an instance cannot remove the last model it serves
            await self._add_to(instance, model_id)
        for model_id in gone + moved:
            await self._one(instance, ipb.CatalogueRequest(action="remove", model=model_id), CALL_TIMEOUT_S)
        for model_id in moved:
            await self._add_to(instance, model_id)
        return new + moved, gone + moved

    async def _add_to(self, instance, model_id: str) -> None:
        await self._one(instance, ipb.CatalogueRequest(action="add", model=model_id,
                                                        folder=str(self._folder_of(model_id))), ADD_TIMEOUT_S)

    def _moved(self, folders: dict[str, str]) -> list[str]:
        """The served ids that folders (id -> folder) has from another folder than the served one."""
        return [m for m in sorted(set(self.models) & set(folders)) if not _same_folder(folders[m],
                                                                                       self._folder_of(m))]

    def _serve_held(self, model_id: str, folder: str) -> bool:
        """Serve a model an instance holds -> whether its folder could be read here."""
        try:
            served = served_model_from_folder(model_id, Path(folder), self.dtype)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("model %s, which an instance holds, is not served: its folder %s: %s", model_id,
                        folder, exc)
            return False
        self._start_serving(model_id, served, Path(folder))
        return True

    def _start_serving(self, model_id: str, served: ServedModel, folder: Path) -> None:
        self.models[model_id], self._folders[model_id] = served, folder
        if self.metrics is not None:
            self.metrics.add_model(model_id)

    def _stop_serving(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        self.backend.dispatcher.timings.pop(model_id, None)
        self._folders.pop(model_id, None)
        if self.metrics is not None:
            self.metrics.remove_model(model_id)

    # -- fan-out ----------------------------------------------------------------------------------

    def _instances(self) -> list:
        return [*self.backend.prefill, *self.backend.decode]

    def _in_service(self) -> list:
        """The instances a change goes to now: not lost (sync() brings a lost one in step later)."""
        return [i for i in self._instances() if not i.lost.is_set()]

    def _out_of_service(self) -> str:
        lost = [i.name for i in self._instances() if i.lost.is_set()]
        return f"; {', '.join(lost)} out of service: brought in step when it answers again" if lost else ""

    def _one_per_node(self) -> dict[str, object]:
        """node -> one of its instances, a live one if any: the host cache is the node's (one node: "")"""
        per_node: dict[str, object] = {}
        for instance in sorted(self._instances(), key=lambda i: i.lost.is_set()):
            per_node.setdefault(self.backend.nodes.get(instance.name, ""), instance)
        return per_node

    def _known(self, model_id: str) -> ServedModel:
        if model_id not in self.models:
            raise AdminRefusal(grpc.StatusCode.NOT_FOUND, f"id: model {model_id!r} is not served "
                               f"({len(self.models)} models are)")
        return self.models[model_id]

    def _folder_of(self, model_id: str) -> str:
        return self._folders.get(model_id, "")

    async def _one(self, instance, request: ipb.CatalogueRequest, timeout: float) -> ipb.CatalogueReply:
        try:
            return await instance.stub.Catalogue(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise AdminRefusal(exc.code(), exc.details() or f"{instance.name}: {exc.code().name}") from None

    async def _fan_out(self, request: ipb.CatalogueRequest, timeout: float,
                       undo: ipb.CatalogueRequest | None = None) -> list[tuple[str, ipb.CatalogueReply]]:
        """request on every instance in service -> (name, reply) each; if any refuses, undo on those
        that did it and raise the first refusal."""
        instances = self._in_service()
        if not instances:
            raise AdminRefusal(grpc.StatusCode.UNAVAILABLE, f"{request.action} {request.model}: no instance "
                               f"is in service (every one is lost); nothing was changed")
        results = await asyncio.gather(*(self._one(i, request, timeout) for i in instances),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed:
            return [(i.name, r) for i, r in zip(instances, results, strict=True)]
        if undo is not None:
            done = [i for i, r in zip(instances, results, strict=True) if not isinstance(r, BaseException)]
            await asyncio.gather(*(self._one(i, undo, timeout) for i in done), return_exceptions=True)
        if isinstance(failed[0], AdminRefusal):
            raise failed[0]
        raise AdminRefusal(grpc.StatusCode.INTERNAL, f"{request.action} {request.model}: {failed[0]}")


def _merge(model_id: str, replies: list[tuple[str, ipb.CatalogueReply]]) -> apb.CatalogueEntry:
    """One model as the stack sees it, from the instances' views: resident anywhere beats in the
    host cache beats on disk; requests add up."""
    views = [(name, m) for name, r in replies for m in r.models if m.id == model_id]
    entry = apb.CatalogueEntry(id=model_id)
    if not views:
        return entry
    tiers = {m.tier for _, m in views}
    entry.tier = next(t for t in ("resident", "host", "disk") if t in tiers)
    entry.folder, entry.weight_bytes = views[0][1].folder, views[0][1].weight_bytes
    entry.requests = sum(m.requests for _, m in views)
    entry.loading = any(m.loading for _, m in views)
    entry.waiting_for_room = any(m.waiting_for_room for _, m in views)
    entry.loaded_bytes = max(m.loaded_bytes for _, m in views)
    entry.resident_on.extend(sorted(name for name, m in views if m.tier == "resident"))
    return entry


def _same_folder(a: str | Path, b: str | Path) -> bool:
    """Two spellings of one model folder (a symlink to it, a relative path) are one folder."""
    return os.path.realpath(a) == os.path.realpath(b)
