"""Who may call the endpoint (API keys) and how much it may send: the ingress's ASGI guard.

API keys are bearer tokens (``Authorization: Bearer KEY``) read from a file (one per line; a line
``sha256:HEX`` holds a key's digest instead of the key) or from an environment variable
(keys separated by commas or whitespace), both named in the app's ``settings.auth``. Only their
SHA-256 digests are kept; a presented key is hashed and compared with every digest in constant
time. ``/v1/*`` and the MONAI Label routes need a key, wherever the app is mounted; ``/healthz``,
``/readyz`` (without the model ids), the page and the API docs stay open. A request without a
valid key, or with two ``Authorization`` headers, is answered before its body is read; keys never
reach a log.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from starlette._utils import get_route_path

from serve.limits import IDLE_S, BodyLimit, Receive, Scope, Send, send_json, upload_bytes

# /v1 and the MONAI Label routes (serve/monailabel.py; /auth/ and /auth/token stay open for its login)
PROTECTED = ("/v1/", "/info", "/infer", "/datastore", "/session", "/auth/token/valid")


class AuthError(ValueError):
    """The auth settings name a file or variable that holds no key."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """SHA-256 digests of the accepted keys."""

    def __init__(self, digests: list[bytes]):
        if not digests:
            raise AuthError("authentication is on but no API key was found")
        self.digests = digests

    @staticmethod
    def configured(auth: dict[str, Any] | None) -> bool:
        """Whether ``settings.auth`` names a key file or variable (otherwise the endpoint is open)."""
        return bool((auth or {}).get("api_keys_file") or (auth or {}).get("api_keys_env"))

    @classmethod
    def from_settings(cls, auth: dict[str, Any] | None) -> ApiKeys | None:
        """None when neither ``api_keys_file`` nor ``api_keys_env`` is set (the endpoint is open)."""
        if not cls.configured(auth):
            return None
        file, env = auth.get("api_keys_file"), auth.get("api_keys_env")
        digests: list[bytes] = []
        if file:
            path = Path(os.path.expanduser(str(file)))
            if not path.is_file():
                raise AuthError(f"settings.auth.api_keys_file: {path} is not a file")
            for line in path.read_text().splitlines():
                line = line.strip()
                if line.startswith("sha256:"):
                    digests.append(bytes.fromhex(line.removeprefix("sha256:")))
                elif line and not line.startswith("#"):
                    digests.append(_digest(line))
        if env:
            value = os.environ.get(str(env), "")
            if not value.strip():
                raise AuthError(f"settings.auth.api_keys_env: the environment variable {env} is unset or empty")
            digests += [_digest(key) for key in value.replace(",", " ").split()]
        return cls(digests)

    def allows(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        presented = _digest(key.strip()) if scheme.lower() == "bearer" and key.strip() else b"\0" * 32
        matches = [hmac.compare_digest(presented, digest) for digest in self.digests]  # no early exit
        return any(matches)


class IngressGuard:
    """ASGI middleware of the ingress app: a key for ``/v1/*``, then ``BodyLimit``.

    Serve builds the FastAPI app, middleware included, before a replica receives the app's
    settings, so the replica sets ``keys`` and ``max_bytes`` on this class when it starts (one
    ingress app per replica process); they are read when the first request builds the stack."""

    keys: ApiKeys | None = None
    max_bytes: int = upload_bytes({})
    idle_s: float = IDLE_S

    def __init__(self, app):
        self.keys_in_force = type(self).keys
        self.limited = BodyLimit(app, type(self).max_bytes, where="ingress", idle_s=type(self).idle_s)

    @classmethod
    def configure(cls, settings: dict[str, Any]) -> None:
        cls.keys = ApiKeys.from_settings(settings.get("auth"))
        cls.max_bytes = upload_bytes(settings)
        cls.idle_s = float(settings.get("body_idle_s", IDLE_S))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys_in_force is not None and route_path(scope).startswith(PROTECTED):
            presented = [value for name, value in scope.get("headers") or [] if name.lower() == b"authorization"]
            if len(presented) > 1:  # readers disagree on which one counts (the last here, the first in FastAPI)
                return await send_json(send, 400, {"detail": "more than one Authorization header"})
            if not self.keys_in_force.allows(presented[0].decode("latin-1") if presented else None):
                return await send_json(send, 401, {"detail": "a valid API key is needed: Authorization: Bearer KEY"},
                                       [(b"www-authenticate", b'Bearer realm="medsam3"')])
        return await self.limited(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path the app routes on: Serve mounts an app under its ``route_prefix`` by passing the
    full path with ``root_path`` set to the prefix. Starlette's own function, so the guard and
    the router cannot disagree on which route a request reaches."""
    return get_route_path(scope)
