"""SharedCatalogue: the served models (id -> folder), shared by the proxies in front of one fleet.

A catalogue change (tokenpool.v1.Admin) reaches the instances through the proxy it was made on.
Proxies that share a request table in Redis serve the same instances, so they must serve the same
models, and each one's sync of a returning instance must bring it to that same set. The set lives
beside the table:

    tokenpool:{name}:catalogue           hash    model id -> folder
    tokenpool:{name}:catalogue-version   string  INCR on every change (absent: never written)
    tokenpool:{name}:catalogue-base      string  fingerprint() of the flags the set grew from

A change is written before it fans out to the instances (and undone if the fan-out is), so a
proxy that syncs a returning instance meanwhile already brings it to the new set. Every proxy
polls the version (AdminServicer.follow) and serves what the hash holds. A proxy that starts
takes the set over only if it grew from the same flags (its base): with other flags it is a new
configuration (a redeploy), whose flags win and replace it. The single-proxy default, a
shared-memory table, has nothing to share: make_shared_catalogue gives None.
"""

from __future__ import annotations

import hashlib
from typing import Any

POLL_S = 1.0  # how often a proxy looks for another proxy's change


class RedisCatalogue:
    """The catalogue in the Redis server of a Redis request table named `name`. Blocking calls
    (network round trips): the proxy makes them off its event loop."""

    def __init__(self, url: str, name: str, client: Any = None) -> None:
        from .redis_request_table import connect, key_prefix  # the optional backend's import stays lazy

        self._redis = client if client is not None else connect(url)
        prefix = key_prefix(name)
        self._hash, self._version = prefix + "catalogue", prefix + "catalogue-version"
        self._base = prefix + "catalogue-base"

    def version(self) -> int:
        """0 while nothing was ever written."""
        return int(self._redis.get(self._version) or 0)

    def read(self) -> tuple[int, str, dict[str, str]]:
        """-> (version, base, id -> folder), read together."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._version).get(self._base).hgetall(self._hash)
        version, base, models = pipe.execute()
        return int(version or 0), (base or b"").decode(), {k.decode(): v.decode() for k, v in models.items()}

    def put(self, model_id: str, folder: str) -> None:
        self._change(lambda pipe: pipe.hset(self._hash, model_id, folder))

    def drop(self, model_id: str) -> None:
        self._change(lambda pipe: pipe.hdel(self._hash, model_id))

    def replace(self, models: dict[str, str], base: str) -> int:
        """The whole set at once, grown from flags of fingerprint base -> its version (the first
        proxy of a fleet, or of a new configuration, writes what it serves)."""
        def write(pipe) -> None:
            pipe.delete(self._hash)
            if models:
                pipe.hset(self._hash, mapping=models)
            pipe.set(self._base, base)
        return self._change(write)

    def close(self) -> None:
        self._redis.close()

    def _change(self, write) -> int:
        pipe = self._redis.pipeline(transaction=True)  # MULTI/EXEC: the set and its version together
        write(pipe)
        pipe.incr(self._version)
        return int(pipe.execute()[-1])


def fingerprint(flags: dict[str, str]) -> str:
    """Of a proxy's start-up catalogue (id -> folder): equal flags, equal fingerprints."""
    text = "\n".join(f"{m}={f}" for m, f in sorted(flags.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_shared_catalogue(table_backend: str, url: str | None, name: str) -> RedisCatalogue | None:
    """The catalogue shared with the other proxies of this table, or None (one proxy: shm)."""
    return RedisCatalogue(url, name) if table_backend == "redis" else None
