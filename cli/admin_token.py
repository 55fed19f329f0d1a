"""The admin token: what every call to the proxy's admin service (tokenpool.v1.Admin) must carry.

    --admin-token-file FILE   (proxy, `tokenpool up`) the token is the file's first line; the file
                              must be readable by its owner only
    calls                     "authorization: Bearer <token>"; `tokenpool models add/remove/...`
                              send it from --admin-token-file or $TOKENPOOL_ADMIN_TOKEN_FILE

A proxy started without a token refuses every admin call (PERMISSION_DENIED): the catalogue
cannot be changed by anyone who merely reaches the public port. The public API's own token
(--auth-token-file) does not open the admin service, nor the other way round; tokens are
compared in constant time.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from .server_security import read_private_token

ENV = "TOKENPOOL_ADMIN_TOKEN_FILE"
FLAG = "--admin-token-file"


def read_admin_token(path: Path) -> str:
    """ValueError naming the flag: unreadable, readable by others than its owner, or no token."""
    return read_private_token(path, f"{FLAG} ")


def client_token_file(path: Path | None) -> Path:
    """The token file a client uses: the flag's, else $TOKENPOOL_ADMIN_TOKEN_FILE's."""
    if path is None and os.environ.get(ENV):
        path = Path(os.environ[ENV])
    if path is None:
        raise ValueError(f"the admin API needs its token: pass {FLAG} FILE or set {ENV}")
    return path


class AdminGuard:
    """Checks one call's token; refusals are (status, message) for the servicer to abort with."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    def refusal(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        if self._expected is None:
            return grpc.StatusCode.PERMISSION_DENIED, (f"the admin API is off: start the proxy with {FLAG} "
                                                       f"(tokenpool up {FLAG} FILE)")
        given = dict(metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given, self._expected):
            return grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token"
        return None
