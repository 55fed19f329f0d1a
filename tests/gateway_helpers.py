"""Plain HTTP calls to a stack's gateway (http.client: exact bytes, status and headers)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


def connection(stack, timeout: float = 240) -> http.client.HTTPConnection:
    url = urlsplit(stack.gateway_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def request(stack, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
    conn = connection(stack)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post(stack, path: str, payload, headers: dict | None = None) -> Reply:
    return request(stack, "POST", path, json.dumps(payload).encode(), headers)


def get(stack, path: str, headers: dict | None = None) -> Reply:
    return request(stack, "GET", path, headers=headers)
