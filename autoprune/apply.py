"""Apply a policy for real: prune, optionally fine-tune (also iteratively), judge on the test split.

Iterative pruning (MIT 6.5940 lecture 3; Han et al. 2015): instead of removing everything at
once, ``steps`` rounds each prune a little more (ratios ramp to the target, cubic by default,
Zhu & Gupta 2017) and fine-tune, letting the network recover between cuts. Each round re-ranks
the surviving channels / weights with the task's criterion on the current, fine-tuned weights.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.budget import Budget, within
from autoprune.costs.counting import count_params, measure_macs
from autoprune.costs.latency import measure_latencies, measure_latency
from autoprune.costs.runtimes import check_runtime, runtime_rows
from autoprune.engine.criteria import CriterionContext, compute_scores
from autoprune.engine.pruning import (
    Ranking,
    make_masks_permanent,
    prune_model,
    ramp,
    remove_channels,
)
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError
from autoprune.models import ModelError, build_model, state_dict_mismatch
from autoprune.models.registry import uncompiled
from autoprune.policy import Policy
from autoprune.task import CRITERION_SAMPLES, Task
from autoprune.training import fine_tune

Progress = Callable[[str], None]


@dataclass
class ApplyResult:
    """The pruned (and fine-tuned) model with test-split metrics before and after."""

    model: nn.Module
    before: dict[str, float]
    after: dict[str, float]
    pruned_no_finetune: dict[str, float]
    steps: list[dict[str, Any]] = field(default_factory=list)
    latency_batch: int | None = None  # batch size of the latency measurements (None: not timed)
    # Dense against pruned on each runtime asked for (``runtimes=`` of :func:`apply_policy`):
    # rows of ``runtime``, ``batch``, ``dense_ms``, ``pruned_ms``, ``speedup`` (or ``error``).
    runtimes: list[dict[str, Any]] = field(default_factory=list)

    def measured_ratios(self) -> dict[str, float]:
        """Pruned / dense of what was measured on the final model: ``flops`` (MACs), ``params``
        and, when timed, ``latency``."""
        keys = {"flops": "macs", "params": "params", "latency": "latency_ms"}
        return {
            metric: self.after[key] / self.before[key]
            for metric, key in keys.items()
            if key in self.after and self.before.get(key)
        }

    def budget_check(self, budget: Budget | Mapping[str, float]) -> dict[str, dict[str, Any]]:
        """Each limit of a search budget against the measured ratio: ``limit``, ``measured``
        and ``met`` (both None for a metric not measured, e.g. latency with latency=False). A
        latency budget is searched against a lookup table; this is where it meets the clock."""
        measured = self.measured_ratios()
        limits = budget.limits if isinstance(budget, Budget) else budget
        out: dict[str, dict[str, Any]] = {}
        for metric, limit in limits.items():
            value = measured.get(metric)
            met = None if value is None else within(value, limit)
            out[metric] = {"limit": float(limit), "measured": value, "met": met}
        return out


def model_metrics(task: Task, model: nn.Module, latency: bool = True) -> dict[str, float]:
    """Test accuracy and loss, measured MACs and params (non-zero only for masked granularities)
    and, optionally, measured CPU latency (batch 1, one thread) of a model."""
    sparse = task.space.granularity != "channel"
    acc, loss = task.score(model, "test")
    out = {
        "test_accuracy": acc,
        "test_loss": loss,
        "macs": float(measure_macs(model, task.input_shape, nonzero_only=sparse)),
        "params": float(count_params(model, nonzero_only=sparse)),
    }
    if latency:
        out["latency_ms"] = 1e3 * measure_latency(model, task.input_shape, repeats=30)
    return out


_DENSE: weakref.WeakKeyDictionary[Task, dict[str, float]] = weakref.WeakKeyDictionary()


def dense_metrics(task: Task, latency: bool = True) -> dict[str, float]:
    """:func:`model_metrics` of the task's dense model, measured once per task (the dense model
    is never changed; a test pass over its full test split is the dearest part of scoring a
    policy, so every applied policy of a search reuses it)."""
    known = _DENSE.get(task)
    if known is None:
        known = _DENSE[task] = model_metrics(task, task.model, latency=False)
    if latency and "latency_ms" not in known:
        known["latency_ms"] = 1e3 * measure_latency(task.model, task.input_shape, repeats=30)
    return {k: v for k, v in known.items() if latency or k != "latency_ms"}


def _relative(current: PruningSpace, task: Task, target: np.ndarray) -> np.ndarray:
    """Ratios for the current (already pruned) model that reach ``target`` of the dense one."""
    if current.granularity != "channel":
        return target
    dense_sizes = np.array([u.size for u in task.space.units], dtype=np.float64)
    kept = dense_sizes - task.space.removed_counts(target)
    sizes = np.array([current.unit(u.name).size for u in task.space.units], dtype=np.float64)
    return np.clip((sizes - kept) / sizes, 0.0, current.max_ratio)


def _prune_step(task: Task, model: nn.Module, target: np.ndarray) -> nn.Module:
    """Prune an already-pruned model further to ``target`` (ratios of the dense model)."""
    cfg = task.config
    model = make_masks_permanent(model)
    space = task.space_for(model)
    x, y = task.data.subset("search", CRITERION_SAMPLES, seed=cfg.seed)
    scores = compute_scores(cfg.criterion, CriterionContext(model, space, x, y, seed=cfg.seed))
    ranking = Ranking.from_scores(space, scores)
    return prune_model(model, space, ranking, _relative(space, task, target), persistent=True)


LATENCY_CHECK_REPEATS = 20  # interleaved rounds per timing of :func:`latency_ratios`


def latency_ratios(
    task: Task, policies: list[np.ndarray], repeats: int = LATENCY_CHECK_REPEATS
) -> list[float]:
    """Measured latency of each policy's pruned model over the dense model's, on this machine.

    Timed like the task's latency table and budget (CPU, one thread, ``eval.latency_batch_size``
    samples per forward pass) and interleaved with the dense model in the same rounds (see
    :func:`autoprune.costs.latency.measure_latencies`), so a machine whose speed drifts skews
    no ratio.
    The models are cut without reconstruction or fine-tuning: channel counts set the latency.
    """
    if not policies:
        return []
    models = [task.prune(v, light=True, reconstruct_layers=False) for v in policies]
    seconds = measure_latencies(
        [task.model, *models], task.input_shape,
        batch_size=task.config.eval.latency_batch_size, threads=1, repeats=repeats,
    )  # fmt: skip
    return [s / seconds[0] for s in seconds[1:]]


def apply_policy(
    task: Task,
    policy: Policy | Mapping[str, float] | np.ndarray,
    finetune_epochs: int = 0,
    steps: int = 1,
    lr: float = 0.01,
    schedule: str = "cubic",
    latency: bool = True,
    progress: Progress | None = None,
    finetune_batches: int | None = None,
    runtimes: Sequence[str] = (),
) -> ApplyResult:
    """Prune the task's model with a policy, fine-tune ``finetune_epochs`` per step, and report
    test metrics before and after. ``steps > 1`` prunes iteratively. ``finetune_batches`` caps
    each step's fine-tune at that many batches (the cosine schedule spans the capped length).
    ``runtimes`` (``"torch"``, ``"onnxruntime"``): also time dense against pruned on each, at
    batch 1 and the task's latency batch (:attr:`ApplyResult.runtimes`)."""
    for runtime in runtimes:
        check_runtime(runtime)
    vec = policy.check(task) if isinstance(policy, Policy) else task.ratio_vector(policy)
    say = progress or (lambda _msg: None)
    cfg = task.config
    if finetune_batches is not None and finetune_batches < 1:
        raise ValueError(f"finetune_batches must be >= 1 or None, got {finetune_batches}")
    if finetune_epochs > 0 and not any(p.requires_grad for p in task.model.parameters()):
        raise ValueError(
            "every parameter of the model is frozen (requires_grad=False): there is nothing "
            "to fine-tune; unfreeze the layers to train or pass finetune_epochs=0"
        )
    before = dense_metrics(task, latency=False)
    targets = ramp(vec, steps, schedule)
    model = task.prune(targets[0], persistent=True)
    task.recalibrate(model)
    pruned_metrics = model_metrics(task, model, latency=False)  # first cut, before fine-tuning
    history: list[dict[str, Any]] = []
    for k, target in enumerate(targets):
        if k > 0:
            model = _prune_step(task, model, target)
            task.recalibrate(model)
        if finetune_epochs > 0:
            say(f"step {k + 1}/{steps}: fine-tuning {finetune_epochs} epoch(s)")
            fine_tune(
                model, task.data, finetune_epochs, lr=lr, device=cfg.device, seed=cfg.seed + k,
                augment=cfg.train.finetune_augment, flip=cfg.train.flip,
                max_batches=finetune_batches,
            )  # fmt: skip
        if k + 1 < len(targets):
            acc, _ = task.score(model, "test")
        else:  # the last step's test pass is the final metrics' (masks made permanent first:
            # the same outputs), not a second pass over the test split
            model = make_masks_permanent(model)
            after = model_metrics(task, model, latency=False)
            acc = after["test_accuracy"]
        history.append({"step": k + 1, "mean_ratio": float(np.mean(target)), "test_accuracy": acc})
        say(f"step {k + 1}/{steps}: test accuracy {acc:.4f}")
    batch = cfg.eval.latency_batch_size if latency else None
    if batch is not None:  # timed together, so a machine whose speed drifts does not skew their
        # ratio; at the batch size of the task's latency budget and lookup table
        dense_s, pruned_s = measure_latencies(
            [task.model, model], task.input_shape, batch_size=batch, repeats=30
        )
        before = {**before, "latency_ms": 1e3 * dense_s}
        after["latency_ms"] = 1e3 * pruned_s
    rows = []
    if runtimes:
        say("timing dense and pruned on " + ", ".join(runtimes))
        batches = sorted({1, cfg.eval.latency_batch_size})
        timed = {} if batch is None else {("torch", batch): (dense_s, pruned_s)}  # not twice
        rows = runtime_rows(task.model, model, task.input_shape, batches, runtimes, timed=timed)
    return ApplyResult(
        model, before, after, pruned_metrics, history, latency_batch=batch, runtimes=rows
    )


PRUNED_FORMAT = 1


def save_pruned(path: str | Path, task: Task, model: nn.Module, policy: Policy) -> Path:
    """Save a pruned model as a plain state dict plus what rebuilds its architecture.

    Loading needs no pickled code: :func:`load_pruned` rebuilds the zoo model, removes the same
    number of channels per unit and loads the weights with ``weights_only=True``.
    """
    payload = {
        "format": PRUNED_FORMAT,
        "model": task.config.model.name,
        "model_kwargs": dict(task.config.model.kwargs),
        "in_channels": task.data.in_channels,
        "num_classes": task.data.num_classes,
        "input_shape": list(task.input_shape),
        "granularity": task.config.granularity,
        "round_to": task.config.round_to,
        "nm_m": task.config.nm.m,
        "classifier": task.space.classifier,
        "user_module": task.checkpoint is None and task.config.model.name.endswith("(nn.Module)"),
        "ignore": list(task.config.ignore),
        "policy": policy.to_json(),
        "state_dict": make_masks_permanent(model).state_dict(),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return out


def load_pruned(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, Policy]:
    """Load a model written by :func:`save_pruned` (``weights_only=True``). A task built from
    your own module needs ``model``: a dense instance of the same architecture (its weights do
    not matter; it is pruned in place to the saved shapes)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"pruned model file not found: {p}")
    payload = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        raise ModelError(f"{p} is not a pruned model written by autoprune")
    policy = Policy.from_dict(json.loads(payload["policy"]), source=str(p))
    if model is None:
        if payload.get("user_module"):
            raise ModelError(
                f"{p} holds a pruned {payload['model']}: pass a dense instance as model="
            )
        model = build_model(
            payload["model"], payload["in_channels"], payload["num_classes"],
            **payload["model_kwargs"],
        )  # fmt: skip
    model = uncompiled(model).eval()
    if payload["granularity"] == "channel":
        try:
            space = PruningSpace(
                model,
                payload["input_shape"],
                "channel",
                0.999,
                payload["round_to"],
                payload["nm_m"],
                classifier=payload.get("classifier"),
                ignore=payload.get("ignore", []),
            )
            vec = space.ratio_vector(policy.ratios)
        except SpaceError as err:
            raise ModelError(
                f"{p} holds a pruned {payload['model']}; the model given, "
                f"{type(model).__name__}, is not that architecture ({err})"
            ) from None
        identity = Ranking("channel", [np.arange(u.size) for u in space.units])
        remove_channels(model, space, identity, space.removed_counts(vec))
    state = payload["state_dict"]
    missing = state_dict_mismatch(model.state_dict(), state)
    if missing:
        raise ModelError(f"{p}: weights do not fit the rebuilt architecture: {missing}")
    model.load_state_dict(state)
    return model, policy
