"""What the service checks before a request body is read or parsed (an ASGI middleware)."""

from __future__ import annotations

import hmac
import json
from typing import Any

from autoprune.service.settings import API, Settings

PUBLIC = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NonFinite(name)


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8080`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    """ASGI middleware: what is checked before a request body is read or parsed.

    1. Without a token (loopback only), the ``Host`` header must name loopback: a web page
       elsewhere cannot reach the service through DNS rebinding.
    2. Every path but the public ones needs the bearer token: a request without it gets 401
       before a byte of its body is read.
    3. Bodies are limited (``limits.body_kb`` for JSON, ``limits.upload_mb`` for checkpoint
       uploads): a declared length above the limit gets 413 at once; a JSON body is read up to
       the limit and no further.
    4. JSON bodies with non-finite numbers (``NaN``, ``Infinity``) get 422.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = self.settings.token
        if not token and _host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
            await _reply(send, 400, "the Host header must name this machine (loopback)")
            return
        path = scope.get("path", "")
        if token and path not in PUBLIC:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()
            ):
                await _reply(send, 401, "missing or wrong bearer token",
                             [(b"www-authenticate", b"Bearer")])  # fmt: skip
                return
        limits = self.settings.limits
        upload = path == f"{API}/checkpoints"
        limit = limits.upload_mb * 1024**2 if upload else limits.body_kb * 1024
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, f"request body larger than {limit} bytes")
            return
        if upload or scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)  # the upload streams and counts for itself
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if len(body) > limit:
                await _reply(send, 413, f"request body larger than {limit} bytes")
                return
            if not message.get("more_body", False):
                break
        if "json" in headers.get("content-type", "") and body:
            try:
                json.loads(bytes(body), parse_constant=_refuse_constant)
            except _NonFinite as bad:
                msg = f"non-finite number {bad} is not accepted"
                await _reply(send, 422, [{"loc": ["body"], "type": "value_error", "msg": msg}])
                return
            except ValueError:
                pass  # malformed JSON: FastAPI answers 422 with where it failed
        sent = False

        async def replay() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(
    send: Any, status: int, detail: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode()), *(extra or [])]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
