"""Uploaded checkpoints: weights a request may name by id, checked and stored by the service.

An upload is read up to its limit, loaded with ``torch.load(..., weights_only=True)``, and kept
only if it is a state dict that fits the zoo model on the service's data (digits). It is stored
as ``<id>.pt`` next to ``<id>.json`` (its model, sha256, size, time); the id is derived from the
content, so uploading the same weights twice gives the same id. Requests name ids, never paths.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException

from autoprune.models import MODELS, build_model, state_dict_mismatch
from autoprune.service.schemas import Checkpoint

CHECKPOINT_PREFIX = "ckpt-"


class CheckpointStore:
    """The folder of uploaded checkpoints: ids to metadata and weight files, and uploads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, checkpoint_id: str) -> Path:
        """The weights file of a checkpoint id."""
        return self.folder / f"{checkpoint_id}.pt"

    def meta(self, checkpoint_id: str) -> dict[str, Any] | None:
        """What was recorded at upload (``model``, ``sha256``, ...); None for an unknown id."""
        if not checkpoint_id.startswith(CHECKPOINT_PREFIX) or not checkpoint_id[5:].isalnum():
            return None
        meta = self.folder / f"{checkpoint_id}.json"
        return json.loads(meta.read_text()) if meta.is_file() else None

    async def upload(
        self, chunks: AsyncIterator[bytes], model: str, limit: int, declared: str | None
    ) -> Checkpoint:
        """Read, check and store the weights for ``model``; HTTP 413 / 422 when refused."""
        if model not in MODELS:
            raise HTTPException(422, f"unknown zoo model {model!r}; choose from {sorted(MODELS)}")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"checkpoint larger than {limit} bytes")
        data = bytearray()
        async for chunk in chunks:
            data.extend(chunk)
            if len(data) > limit:
                raise HTTPException(413, f"checkpoint larger than {limit} bytes")
        _check_weights(bytes(data), model)
        return self._store(bytes(data), model)

    def _store(self, data: bytes, model: str) -> Checkpoint:
        sha = hashlib.sha256(data).hexdigest()
        checkpoint_id = CHECKPOINT_PREFIX + sha[:16]
        self.path(checkpoint_id).write_bytes(data)
        meta = {"id": checkpoint_id, "model": model, "sha256": sha, "bytes": len(data)}
        meta["created"] = datetime.now(UTC).isoformat()
        (self.folder / f"{checkpoint_id}.json").write_text(json.dumps(meta))
        return Checkpoint(id=checkpoint_id, model=model, sha256=sha, bytes=len(data))


def _check_weights(data: bytes, model: str) -> None:
    """A state dict (names -> tensors) that loads safely and fits ``model`` on digits."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or unsafe content
        raise HTTPException(422, f"not a loadable state dict: {str(exc)[:200]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise HTTPException(422, "the file is not a state dict (names -> tensors)")
    net = build_model(model, 1, 10)  # the service's data: digits (1 channel, 10 classes)
    problems = state_dict_mismatch(net.state_dict(), obj)
    if problems:
        raise HTTPException(422, f"the weights do not fit {model} on digits: {problems}")
