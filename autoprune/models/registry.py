"""The model zoo registry, ``package.module:factory`` strings, and checkpoint loading.

A factory has the signature ``factory(in_channels: int = 3, num_classes: int = 10, **kwargs)``
and returns an ``nn.Module``. Checkpoints are loaded with ``weights_only=True`` so a checkpoint
file can never run code.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.models.mobilenetv2 import mobilenetv2
from autoprune.models.resnet import plain20, resnet20, resnet32, resnet56
from autoprune.models.vgg import vgg11, vgg16

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "plain20": plain20,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "mobilenetv2": mobilenetv2,
}


class ModelError(ValueError):
    """A model that cannot be built or a checkpoint that does not fit it."""


def resolve_factory(name: str) -> ModelFactory:
    """Return the factory for a zoo name or a ``package.module:factory`` string."""
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        known = ", ".join(sorted(MODELS))
        raise ModelError(
            f"unknown model {name!r}: not a zoo model ({known}) "
            "and not a 'package.module:factory' string"
        )
    return _import_factory(name)


def _import_factory(spec: str) -> ModelFactory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module's problem
        raise ModelError(f"model {spec!r}: cannot import {module_name!r} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {spec!r}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]


def build_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name, or call a ``package.module:factory`` string.

    Raises :class:`ModelError` for an unknown name, an import failure, arguments the factory
    rejects, or a factory that returns something other than an ``nn.Module``.
    """
    factory = resolve_factory(name)
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise ModelError(f"model {name!r}: the factory rejected its arguments ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {name!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return uncompiled(model)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (the one that is traced, pruned and saved;
    compile the pruned model again to run it compiled), or ``model`` itself. The wrapper's
    graphs would otherwise stand between the tracer and the layers it must see."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return uncompiled(inner)
    return model


def classifier_name(model: nn.Module) -> str:
    """Name of the final Linear layer (the zoo's classifier). Pruning finds the classifier by
    output size instead (:func:`autoprune.engine.geometry.find_classifier`), which also covers
    conv heads."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier")
    return names[-1]


def checkpoint_hash(path: str | Path) -> str:
    """First 16 hex digits of the file's SHA-256: identifies a checkpoint in a fingerprint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict (raw or under a ``state_dict`` key) into ``model`` in place.

    Uses ``torch.load(..., weights_only=True)``. A missing file, an unreadable file, or keys and
    shapes that do not match the model raise :class:`ModelError` with the offending keys.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, unsafe globals, truncated files...
        raise ModelError(f"cannot load checkpoint {p}: {exc}") from exc
    state = _extract_state_dict(obj, p)
    problems = state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise ModelError(f"checkpoint {p} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state)
    return model


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"checkpoint {path} is not a state dict (a mapping of names to tensors, "
            "optionally under a 'state_dict' key)"
        )
    state: OrderedDict[str, torch.Tensor] = OrderedDict(obj)
    metadata = getattr(obj, "_metadata", None)
    if isinstance(metadata, Mapping):  # module versions, read by e.g. _load_from_state_dict
        state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return state


def state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 10
) -> str:
    """Describe missing keys, unexpected keys and shape mismatches; '' when they agree."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = [
        _listing("missing keys", missing, limit),
        _listing("unexpected keys", unexpected, limit),
        _listing("shape mismatches", shapes, limit),
    ]
    return "; ".join(p for p in parts if p)


def _listing(title: str, items: list[str], limit: int) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more
