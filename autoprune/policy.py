"""Policy: the ratio of every unit plus the fingerprint of the task it was found for, as JSON.

```json
{"schema_version": 1,
 "fingerprint": {"model": "resnet20", "checkpoint": "3f2a...", "granularity": "channel", ...},
 "ratios": {"conv1": 0.25, "layer1.0.conv1": 0.5, ...},
 "metrics": {"accuracy": 0.93, "flops_ratio": 0.249, "params_ratio": 0.31},
 "budget": {"flops": 0.25}, "searcher": "ddpg"}
```
Loading validates the schema; :meth:`Policy.check` validates it against a task (same model and
weights, known unit names, ratios within [0, max_ratio]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from autoprune.task import Task

SCHEMA_VERSION = 1
# Fingerprint fields that must match for a policy to apply to a task.
BINDING_FIELDS = ("model", "checkpoint", "granularity", "input_shape")


class PolicyError(ValueError):
    """A policy file that is malformed or was made for another task."""


@dataclass
class Policy:
    ratios: dict[str, float]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)
    searcher: str | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_task(
        cls,
        task: Task,
        ratios: dict[str, float] | np.ndarray,
        metrics: dict[str, Any] | None = None,
        budget: dict[str, float] | None = None,
        searcher: str | None = None,
    ) -> Policy:
        vec = task.ratio_vector(ratios)
        return cls(
            ratios=task.ratios_dict(vec),
            fingerprint=task.fingerprint(),
            metrics=dict(metrics or {}),
            budget=dict(budget or {}),
            searcher=searcher,
        )

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "fingerprint": self.fingerprint,
            "ratios": self.ratios,
            "metrics": self.metrics,
            "budget": self.budget,
            "searcher": self.searcher,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy must be a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PolicyError(f"{source}: unsupported schema_version {version!r}")
        ratios = data.get("ratios")
        if not isinstance(ratios, dict) or not ratios:
            raise PolicyError(f"{source}: 'ratios' must be a non-empty object of unit -> ratio")
        for name, r in ratios.items():
            if isinstance(r, bool) or not isinstance(r, int | float):
                raise PolicyError(f"{source}: ratio of unit {name!r} is not a number: {r!r}")
        unknown = set(data) - {"schema_version", "fingerprint", "ratios", "metrics", "budget",
                               "searcher"}  # fmt: skip
        if unknown:
            raise PolicyError(f"{source}: unknown fields {sorted(unknown)}")
        return cls(
            ratios={str(k): float(v) for k, v in ratios.items()},
            fingerprint=dict(data.get("fingerprint") or {}),
            metrics=dict(data.get("metrics") or {}),
            budget=dict(data.get("budget") or {}),
            searcher=data.get("searcher"),
        )

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        p = Path(path)
        if not p.is_file():
            raise PolicyError(f"policy file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{p}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(p))

    # ------------------------------------------------------------ validation
    def check(self, task: Task) -> np.ndarray:
        """Validate against a task; returns the ratio vector in unit order.

        Refuses a policy made for another model or other weights (fingerprint), unknown unit
        names, missing units, and ratios outside [0, max_ratio].
        """
        mine = task.fingerprint()
        for key in BINDING_FIELDS:
            theirs = self.fingerprint.get(key)
            if theirs is not None and theirs != mine[key]:
                raise PolicyError(
                    f"policy was made for {key}={theirs!r}, but the task has {key}={mine[key]!r}"
                )
        unknown = sorted(set(self.ratios) - set(task.units))
        if unknown:
            raise PolicyError(
                f"policy names units the model does not have: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''} (the model's units: {task.units[:5]} ...)"
            )
        missing = sorted(set(task.units) - set(self.ratios))
        if missing:
            raise PolicyError(f"policy lacks ratios for units {missing[:5]}")
        try:
            return task.ratio_vector(self.ratios)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
