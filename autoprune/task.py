"""A task: what is pruned and how it is judged, built from a config.

``build_task(config)`` validates everything cheap first (config schema, criterion, model name,
data folder, checkpoint fit) and only then does the expensive work (training the default
checkpoint on first use, tracing the model, scoring channels).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune._version import __version__
from autoprune.budget import Budget, BudgetError
from autoprune.config import TaskConfig, task_config
from autoprune.data import DataSplits, Split, load_data
from autoprune.engine.criteria import CriterionContext, compute_scores, get_criterion
from autoprune.engine.equivalence import verify_channel_pruning
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.reconstruct import check_refittable, reconstruct
from autoprune.engine.space import PruningSpace
from autoprune.engine.units import SpaceError
from autoprune.models import build_model, checkpoint_hash, load_checkpoint, resolve_factory
from autoprune.models.registry import uncompiled
from autoprune.training import (
    Metric,
    default_checkpoint,
    evaluate_split,
    recalibrate_bn,
    resolve_device,
)

RatiosLike = Mapping[str, float] | Sequence[float] | np.ndarray
log = logging.getLogger(__name__)
CRITERION_SAMPLES = 256  # images of the search split used by data-driven criteria


class Task:
    """A model with its checkpoint, data splits, pruning space and importance ranking."""

    def __init__(
        self,
        config: TaskConfig,
        model: nn.Module,
        data: DataSplits,
        checkpoint: Path | None,
        checkpoint_digest: str | None = None,
        metric: Metric | None = None,
    ) -> None:
        self.config = config
        self.model = model.eval()
        self.data = data
        self.metric = metric  # None: top-1 accuracy
        self.checkpoint = checkpoint  # ``checkpoint_digest``: its hash, known (remote workers)
        if checkpoint_digest is None:
            checkpoint_digest = checkpoint_hash(checkpoint) if checkpoint else weights_hash(model)
        self.checkpoint_hash = checkpoint_digest
        self.input_shape = tuple(int(s) for s in data.input_shape)
        self.skipped: list[str] = []  # units kept out as unsupported (``ignore_unsupported``)
        self.space = self._verified_space(model)
        if self.config.reconstruct and self.space.granularity == "channel":
            check_refittable(model, self.space)

    def _verified_space(self, model: nn.Module) -> PruningSpace:
        """The task's pruning space, checked by masking equivalence; with
        ``ignore_unsupported``, the units channel pruning refuses are added to ``ignore`` (the
        task's config then names them, so that a policy, a saved model or a Ray worker sees the
        same space) and listed in ``skipped``, and the space is built again without them."""
        while True:
            try:
                space = self.space_for(model, self.config.max_ratio)
                verify_channel_pruning(model, space, seed=self.config.seed)
                return space
            except SpaceError as err:
                new = [u for u in err.units if u not in self.config.ignore]
                if not (self.config.ignore_unsupported and new):
                    if self.skipped and not err.units:
                        raise SpaceError(
                            f"{err} (ignore_unsupported kept out the units {self.skipped})"
                        ) from err
                    raise
                self.skipped += new
                log.warning(
                    "ignore_unsupported: units %s kept out of the search (%s)", new, str(err)[:300]
                )
                ignore = [*self.config.ignore, *new]
                self.config = self.config.model_copy(update={"ignore": ignore})

    def space_for(self, model: nn.Module, max_ratio: float = 0.999) -> PruningSpace:
        """The pruning space of ``model`` (the dense one, or an already pruned copy) with the
        task's granularity, rounding, classifier and ignored layers."""
        cfg = self.config
        return PruningSpace(
            model,
            self.input_shape,
            cfg.granularity,
            max_ratio=max_ratio,
            round_to=cfg.round_to,
            nm_m=cfg.nm.m,
            classifier=cfg.model.classifier,
            ignore=cfg.ignore,
        )

    # ------------------------------------------------------------ identity
    @property
    def units(self) -> list[str]:
        return self.space.names

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> dict[str, Any]:
        """What a policy is valid for: same model, weights, granularity and criterion."""
        fp: dict[str, Any] = {
            "model": self.config.model.name,
            "checkpoint": self.checkpoint_hash,
            "data": self.data.name,
            "input_shape": list(self.input_shape),
            "granularity": self.config.granularity,
            "criterion": self.config.criterion,
            "units": len(self.space),
        }
        if self.config.ignore:
            fp["ignore"] = sorted(self.config.ignore)
        if self.config.model.classifier is not None:
            fp["classifier"] = self.config.model.classifier
        if self.config.granularity == "nm":
            fp["nm_m"] = self.config.nm.m
        return fp

    def describe(self) -> dict[str, Any]:
        out = {**self.fingerprint(), "autoprune": __version__, "splits": self.data.sizes()}
        if self.skipped:
            out["skipped_unsupported"] = list(self.skipped)
        return out

    # ------------------------------------------------------------ judging
    @cached_property
    def search_split(self) -> Split:
        """What policies are scored on: the search split, or its fixed seeded sample of
        ``eval.search_images`` images."""
        n = self.config.eval.search_images
        search = self.data.search
        return search if n is None else search.head(n, seed=self.config.seed)

    def score(self, model: nn.Module, split: str = "search") -> tuple[float, float]:
        """(score, loss) of a model on a split: top-1 accuracy or the task's metric (its loss
        is then NaN), in memory or streamed batch by batch."""
        data = self.search_split if split == "search" else self.data.split(split)
        return evaluate_split(model, data, self.config.eval.batch_size, self.metric)

    def recalibrate(self, model: nn.Module, seed: int | None = None) -> nn.Module:
        """Adaptive batch norm on the task's training images (``eval.bn_batches`` batches)."""
        cfg = self.config.eval
        n = cfg.bn_batches * cfg.bn_batch_size
        if n == 0:
            return model.eval()
        seed = self.config.seed if seed is None else seed
        x, _ = self.data.subset("train", n, seed=seed)
        return recalibrate_bn(model, x.to(self.device), cfg.bn_batches, cfg.bn_batch_size, seed)

    # ------------------------------------------------------------- ranking
    @cached_property
    def scores(self) -> list[np.ndarray]:
        """Importance of every channel / weight of every unit (computed once)."""
        x, y = self.data.subset("search", CRITERION_SAMPLES, seed=self.config.seed)
        ctx = CriterionContext(self.model, self.space, x, y, seed=self.config.seed)
        return compute_scores(self.config.criterion, ctx)

    @cached_property
    def ranking(self) -> Ranking:
        return Ranking.from_scores(self.space, self.scores)

    # ----------------------------------------------------------- policies
    def ratio_vector(
        self, ratios: Mapping[str, float] | Sequence[float] | np.ndarray
    ) -> np.ndarray:
        """Validated ratio vector in unit order (unknown unit or ratio out of range: an error)."""
        return self.space.ratio_vector(ratios)

    def ratios_dict(self, vec: np.ndarray) -> dict[str, float]:
        return {u.name: float(r) for u, r in zip(self.space.units, vec, strict=True)}

    def prune(
        self,
        ratios: RatiosLike,
        persistent: bool = False,
        reconstruct_layers: bool | None = None,
        light: bool = False,
    ) -> nn.Module:
        """A pruned copy of the dense model (the dense model is never changed).

        ``persistent`` keeps fine-grained / N:M masks through fine-tuning; ``reconstruct_layers``
        (default: the task's ``reconstruct`` setting) refits layers after channel removal.
        ``light`` shares unpruned weights with the dense model (evaluation only, never train it).
        """
        vec = self.ratio_vector(ratios)
        pruned = prune_model(
            self.model, self.space, self.ranking, vec, persistent=persistent, light=light
        )
        if reconstruct_layers is None:
            reconstruct_layers = self.config.reconstruct
        if reconstruct_layers and self.space.granularity == "channel":
            x, _ = self.data.subset("train", 256, seed=self.config.seed)
            removed = self.space.removed_counts(vec).tolist()
            reconstruct(pruned, self.model, self.space, x.to(self.device), removed)
        return pruned

    # --------------------------------------------------------------- costs
    @cached_property
    def latency_table(self) -> Any:
        """NetAdapt's per-layer latency lookup table (built once, cached on disk)."""
        if self.space.granularity != "channel":
            raise BudgetError(
                "latency budgets need channel granularity: masked (fine / N:M) weights do not "
                "make dense CPU kernels faster"
            )
        from autoprune.costs.table import LatencyTable

        batch = self.config.eval.latency_batch_size
        return LatencyTable.build(self.model, self.input_shape, threads=1, batch_size=batch)

    @cached_property
    def dense_latency_predicted(self) -> float:
        return float(self.latency_table.predict({}))

    def cost_ratios(self, vec: np.ndarray, metrics: Sequence[str] = ("flops", "params")) -> dict:
        """Analytic cost ratios of a ratio vector; ``latency`` from the lookup table."""
        out = self.space.cost_ratios(vec)
        if "latency" in metrics:
            predicted = self.latency_table.predict(self.space.layer_channels(vec))
            out["latency"] = float(predicted) / self.dense_latency_predicted
        return out

    def check_budget(self, budget: Budget | str | Mapping[str, float]) -> Budget:
        """Parse a budget and make sure the task can measure and reach it."""
        budget = Budget.parse(budget)
        budget.check_reachable(lambda v: self.cost_ratios(v, budget.metrics), self._target(budget))
        return budget

    def project(self, vec: np.ndarray, budget: Budget) -> np.ndarray:
        """Move a ratio vector just far enough towards max_ratio to meet the budget."""
        target = self._target(budget)
        return budget.project(lambda v: self.cost_ratios(v, budget.metrics), vec, target)

    def _target(self, budget: Budget) -> np.ndarray:
        """Where projection heads: every unit at max_ratio, the cheapest policy when costs fall
        as ratios grow (FLOPs, params). Measured latency need not: a layer can run faster at
        some width than at a smaller one, so when the most pruned policy misses a latency
        budget, the uniform policy that misses it least (or meets it) on a grid is the target."""
        max_vec = np.full(len(self.space), self.space.max_ratio)
        if "latency" not in budget.metrics:
            return max_vec
        cache: dict[str, np.ndarray] = self.__dict__.setdefault("_budget_targets", {})
        key = str(budget)
        if key not in cache:
            cost = lambda v: self.cost_ratios(v, budget.metrics)  # noqa: E731
            target = max_vec
            if not budget.met_by(cost(max_vec)):
                grid = [t * max_vec for t in np.linspace(0.05, 1.0, 20)]
                target = min(grid, key=lambda v: budget.excess(cost(v)))
            cache[key] = target
        return cache[key]


def _data_config_error(config: TaskConfig) -> None:
    path = config.data.path
    if path is not None and not Path(path).exists():
        from autoprune.data import DataError

        raise DataError(f"data path does not exist: {path}")


def build_task(
    config: TaskConfig | dict[str, Any] | str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
) -> Task:
    """Build a task from a config (object, dict, YAML path or None for the embedded default:
    ResNet-20 on digits, channel granularity, l2 criterion)."""
    cfg = task_config(config, overrides)
    get_criterion(cfg.criterion, cfg.granularity)  # cheap checks first
    resolve_factory(cfg.model.name)
    if cfg.model.checkpoint is not None and not Path(cfg.model.checkpoint).is_file():
        from autoprune.models import ModelError

        raise ModelError(f"checkpoint not found: {cfg.model.checkpoint}")
    _data_config_error(cfg)
    data = load_data(cfg.data)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg.model.name, data.in_channels, data.num_classes, **cfg.model.kwargs)
    if cfg.model.checkpoint is not None:
        ckpt = Path(cfg.model.checkpoint)
    else:
        ckpt = default_checkpoint(
            cfg.model.name,
            cfg.data,
            cfg.train,
            model_kwargs=cfg.model.kwargs,
            device=cfg.device,
            progress=progress,
        )
    load_checkpoint(model, ckpt)
    model.to(resolve_device(cfg.device))
    return Task(cfg, model, data, ckpt)


def weights_hash(model: nn.Module) -> str:
    """First 16 hex digits of the SHA-256 of a model's state dict (a module given in Python has
    no checkpoint file to hash)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def task_from_module(
    model: nn.Module,
    train: Any,
    test: Any,
    search: Any = None,
    example_input: torch.Tensor | None = None,
    metric: Metric | None = None,
    config: TaskConfig | dict[str, Any] | str | Path | None = None,
    overrides: list[str] | None = None,
    num_classes: int | None = None,
) -> Task:
    """A task from your own model and data (issue 14).

    ``train`` / ``test`` / ``search``: tensors ``(x, y)``, ``Dataset``s of ``(input, label)``
    items, or ``DataLoader``s; ``search`` defaults to ``data.search_size`` items carved from
    ``train``. ``example_input``, when given, is checked against the data's input shape (the
    model is traced and costed on float zeros of that shape).
    ``metric(model, batches) -> float`` (higher is better) replaces top-1 accuracy. ``config``
    sets everything else (granularity, criterion, evaluation, ``ignore``, ``model.classifier``);
    its ``model.name`` / ``data`` entries are not used. Bad input is refused before any work.
    """
    from autoprune.data.user import user_splits

    cfg = task_config(config, overrides)
    if isinstance(model, nn.Module):
        model = uncompiled(model)  # a torch.compile'd model: its module is what is pruned
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"name": f"{type(model).__name__} (nn.Module)", "checkpoint": None})})  # fmt: skip
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    get_criterion(cfg.criterion, cfg.granularity)
    data = user_splits(train, test, search, cfg.data.search_size, cfg.data.seed,
                       num_classes, name="user")  # fmt: skip
    model = model.to(resolve_device(cfg.device)).eval()
    width = _check_model(model, data, example_input, num_classes)
    data.num_classes = width
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = Task(cfg, model, data, None, metric=metric)
    if metric is not None:
        _check_metric(task)
    return task


def _check_model(
    model: nn.Module, data: DataSplits, example: torch.Tensor | None, num_classes: int | None
) -> int:
    """The model's output width, after checking it against the example input and the labels."""
    from autoprune.data import DataError
    from autoprune.data.user import checked_labels

    shape = tuple(data.input_shape)
    if example is not None:
        got = tuple(example.shape[1:]) if example.dim() == len(shape) + 1 else tuple(example.shape)
        if got != shape:
            raise DataError(f"example_input has shape {tuple(example.shape)}; the data's "
                            f"inputs are {shape} (one sample)")  # fmt: skip
    x, _ = data.subset("search", 64, seed=0)
    if not x.dtype.is_floating_point:
        raise DataError(
            f"inputs are {x.dtype}; autoprune traces, costs and checks models on float inputs, "
            "so models on integer inputs (token ids) are not supported: feed float features, "
            "or embed the ids in the data pipeline"
        )
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model(x[:2].to(device))
    except Exception as exc:  # the user's model: name it and the input it failed on
        raise ValueError(f"{type(model).__name__} fails on inputs of shape {shape}: "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} must return (batch, classes) logits, got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}"
        )
    width = int(out.shape[1])
    if num_classes is not None and width != num_classes:
        raise ValueError(f"{type(model).__name__} has {width} outputs, not num_classes="
                         f"{num_classes}")  # fmt: skip
    for what in ("train", "search", "test"):
        labels = checked_labels(data.split(what))
        if len(labels) and int(labels.max()) >= width:
            raise ValueError(f"{what} labels reach {int(labels.max())} but "
                             f"{type(model).__name__} has only {width} outputs")  # fmt: skip
    return width


def _check_metric(task: Task) -> None:
    """Run the user's metric once on the dense model, so a broken one fails now, not mid-search."""
    import math

    try:
        value = task.score(task.model)[0]
    except Exception as exc:
        raise ValueError(f"the metric raised {type(exc).__name__}: {exc}") from exc
    if not math.isfinite(value):
        raise ValueError(f"the metric returned {value!r}; it must return a finite float")
