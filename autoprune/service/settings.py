"""How the service runs and what it allows: :class:`Settings`, the bearer token, the bind check.

Without a token the service listens on loopback only (:func:`check_bind`); the token comes from
``AUTOPRUNE_TOKEN`` or a token file (:func:`load_token`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import BaseModel, Field

from autoprune.service.limits import Limits

API = "/v1"  # the prefix of every versioned endpoint


class ServiceError(RuntimeError):
    """The service cannot start as configured."""


class Settings(BaseModel):
    """How the service runs and what it allows."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token: str | None = None
    tracking_uri: str | None = None
    experiment: str = "service"
    ray_address: str | None = None
    max_concurrent: int = Field(default=2, ge=0, description="Searches running at once.")
    limits: Limits = Field(default_factory=Limits, description="What one request may cost.")
    state_dir: Path = Path(".autoprune") / "service"
    http_nice: int = Field(
        default=10, ge=0, le=19, description="CPU niceness of the HTTP thread vs the searches."
    )


def load_token(token_file: Path | None = None) -> str | None:
    """The bearer token: ``AUTOPRUNE_TOKEN``, else the first line of ``token_file``."""
    token = os.environ.get("AUTOPRUNE_TOKEN", "").strip()
    if token:
        return token
    if token_file is not None:
        if not token_file.is_file():
            raise ServiceError(f"token file not found: {token_file}")
        lines = token_file.read_text().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ServiceError(f"token file {token_file} is empty")
        return token
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse an unauthenticated service on anything but loopback."""
    if not settings.token and not is_loopback(settings.host):
        raise ServiceError(
            f"refusing to listen on {settings.host} without a token: set AUTOPRUNE_TOKEN or "
            "--token-file (without a token the service binds to loopback only)"
        )
