"""The benchmark plan: the YAML file as a typed model, and the groups it expands to.

A plan (``experiments/benchmark.yaml``) names searchers, budgets, seeds and models; every model x
budget is a *group* (one experiment: all searchers x seeds, channel granularity), and ``extra``
adds fine-grained / N:M groups. :class:`PlanFile` is the file as written (unknown keys are
errors, budgets are read by :class:`autoprune.budget.Budget`, every error names the field's
path, e.g. ``extra.1.budget``); :func:`load_plan` narrows it the way the command line asks
(:class:`Narrowing`) and returns a :class:`Plan` whose every group's experiment config has been
validated, so bad input fails before any work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from autoprune.agents import get_searcher
from autoprune.budget import Budget
from autoprune.config import ConfigError, load_yaml
from autoprune.runner.config import ExperimentConfig, experiment_config

MAIN_BUDGET = "flops=0.25"  # the default main budget (the plan's ``main_budget``)
GRANULARITIES = ("channel", "fine", "nm")


def _budget(text: str) -> str:
    """A budget as the plan spells it (group keys use that spelling), once it parses."""
    Budget.parse(text)
    return text


def _searcher(name: str) -> str:
    get_searcher(name)  # SearchError (a ValueError) names the known searchers
    return name


BudgetText = Annotated[str, AfterValidator(_budget)]
SearcherName = Annotated[str, AfterValidator(_searcher)]
Options = dict[str, dict[str, Any]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """One model of the plan: its evaluations, per-searcher options, seeds and checkpoint."""

    evaluations: int = Field(default=100, ge=1, description="Evaluations of every searcher.")
    options: Options = Field(default_factory=dict, description="Per-searcher option overrides.")
    seeds: list[int] | None = Field(default=None, description="None: the plan's seeds.")
    checkpoint: str | None = Field(
        default=None, description="A shipped checkpoint, relative to the plan's folder."
    )


class ExtraSpec(_Strict):
    """A granularity group: one model at one budget, fine-grained or N:M."""

    model: str
    granularity: Literal["channel", "fine", "nm"]
    budget: BudgetText
    criterion: str | None = None
    searchers: list[str] | None = Field(default=None, description="None: the plan's searchers.")


class PlanFile(_Strict):
    """The plan as written in its YAML file."""

    experiment: str = "benchmark"
    agent: str = Field(default="ddpg", description="The searcher the verdicts judge.")
    searchers: list[SearcherName] = Field(default_factory=list)
    budgets: list[BudgetText] = Field(default_factory=list)
    main_budget: BudgetText = MAIN_BUDGET
    seeds: list[int] = Field(default_factory=list)
    deterministic: list[str] = Field(default_factory=list)
    finetune_epochs: int = Field(default=1, ge=0)
    finetune_batches: int | None = Field(default=None, ge=1)
    workers: int | None = Field(default=None, ge=0, description="None or 0: every core.")
    task: dict[str, Any] = Field(default_factory=dict)
    options: Options = Field(default_factory=dict)
    models: dict[str, ModelSpec | None] = Field(default_factory=dict)
    extra: list[ExtraSpec] = Field(default_factory=list)
    # Searchers whose evaluation count the model sets (sensitivity: units x grid + 2): they do
    # not get the group's equal evaluations, which would only be a limit they fail.
    own_evaluations: list[str] = Field(default_factory=lambda: ["sensitivity"])


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return str(error["msg"]).removeprefix("Value error, ")


def read_plan_file(path: Path) -> PlanFile:
    """The plan of ``path``; a ConfigError naming the file and each bad field's path."""
    if not path.is_file():
        raise ConfigError(f"benchmark plan {path} not found")
    raw = load_yaml(path)
    try:
        return PlanFile.model_validate(raw)
    except ValidationError as err:
        parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {_message(e)}" for e in err.errors()]
        raise ConfigError(f"{path}: " + "; ".join(parts)) from None


@dataclass(frozen=True)
class Narrowing:
    """What the command line takes of the plan (None / empty: the plan's own)."""

    models: list[str] | None = None
    budgets: list[str] | None = None
    searchers: list[str] | None = None
    seeds: list[int] | None = None
    evaluations: int | None = None
    finetune_epochs: int | None = None
    workers: int | None = None
    no_extra: bool = False
    granularities: list[str] | None = None
    experiment: str | None = None
    slice: tuple[str, str] | None = None  # (model, budget): that group only

    def flags(self) -> list[str]:
        """These choices as command-line flags (for the record of what ran)."""
        out: list[str] = []
        for name in ("models", "budgets", "searchers", "seeds", "granularities"):
            values = getattr(self, name)
            if values:
                out += [f"--{name}", ",".join(map(str, values))]
        for name in ("evaluations", "finetune_epochs", "workers", "experiment"):
            value = getattr(self, name)
            if value is not None:
                out += [f"--{name.replace('_', '-')}", str(value)]
        if self.no_extra:
            out.append("--no-extra")
        if self.slice is not None:
            out += ["--slice", *self.slice]
        return out


@dataclass(frozen=True)
class Group:
    """One experiment of the benchmark: a model, a granularity and a budget, all its searchers."""

    model: str
    granularity: str
    budget: str
    searchers: tuple[str, ...]
    evaluations: int
    options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per-model overrides
    criterion: str | None = None  # None: the plan's
    seeds: tuple[int, ...] | None = None  # None: the plan's
    checkpoint: str | None = None  # None: the model's default (cached) checkpoint

    @property
    def key(self) -> str:
        return f"{self.model}/{self.granularity}/{self.budget}"


@dataclass
class Plan:
    """A plan narrowed by the command line: its settings and the groups to run, in order."""

    experiment: str
    seeds: list[int]
    deterministic: list[str]
    finetune_epochs: int
    workers: int
    task: dict[str, Any]
    options: Options
    groups: list[Group] = field(default_factory=list)
    finetune_batches: int | None = None
    main_budget: str = MAIN_BUDGET
    agent: str = "ddpg"
    own_evaluations: list[str] = field(default_factory=lambda: ["sensitivity"])
    source: Path | None = None  # the plan's file

    def config(self, group: Group, tracking_uri: str | None) -> ExperimentConfig:
        """The group's experiment config (validated: bad input fails before any work)."""
        seeds = list(group.seeds) if group.seeds is not None else self.seeds
        data = {
            **self.task,
            "model": {
                **self.task.get("model", {}),
                "name": group.model,
                **({"checkpoint": group.checkpoint} if group.checkpoint else {}),
            },
            "granularity": group.granularity,
            **({"criterion": group.criterion} if group.criterion else {}),
            "search": {
                "searchers": list(group.searchers),
                "budget": group.budget,
                "seeds": seeds,
                "workers": self.workers,
                "options": self._options(group, seeds),
                "finetune_epochs": self.finetune_epochs,
                "finetune_batches": self.finetune_batches,
            },
            "tracking": {"uri": tracking_uri, "experiment": self.experiment},
        }
        return experiment_config(data)

    def _options(self, group: Group, seeds: list[int]) -> Options:
        """Per-searcher options of a group: the plan's, the model's, equal evaluations for
        every searcher with a choice, one seed for the deterministic ones."""
        options = {k: dict(v) for k, v in self.options.items() if k in group.searchers}
        for name, items in group.options:
            if name in group.searchers:
                options.setdefault(name, {}).update(dict(items))
        for name in group.searchers:
            if get_searcher(name).fixed_evaluations is None and name not in self.own_evaluations:
                options.setdefault(name, {}).setdefault("evaluations", group.evaluations)
        for name in self.deterministic:
            if name in group.searchers:
                options.setdefault(name, {})["seeds"] = seeds[:1]
        return options


def load_plan(path: Path, narrowing: Narrowing | None = None) -> Plan:
    """The plan of ``path`` narrowed by ``narrowing``; every group validated."""
    narrow = narrowing or Narrowing()
    spec = read_plan_file(path)
    plan = _settings(spec, narrow)
    plan.source = path
    models = _models(spec, narrow)
    expand = _Expander(spec, narrow, path.parent)
    plan.groups = expand.channel_groups(models) + expand.extra_groups(models)
    plan.groups = _selected(plan.groups, narrow)
    for group in plan.groups:
        try:
            plan.config(group, None)
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"group {group.key}: {err}") from None
    return plan


def _settings(spec: PlanFile, narrow: Narrowing) -> Plan:
    """The plan's settings, the command line's where it gives them; no groups yet."""
    for budget in narrow.budgets or []:
        _flag("--budgets", Budget.parse, budget)
    workers = narrow.workers
    if workers is None:
        workers = spec.workers or os.cpu_count() or 1
    return Plan(
        experiment=narrow.experiment or spec.experiment,
        seeds=list(narrow.seeds or spec.seeds or [0]),
        deterministic=list(spec.deterministic),
        finetune_epochs=(
            narrow.finetune_epochs if narrow.finetune_epochs is not None else spec.finetune_epochs
        ),
        workers=workers,
        task=dict(spec.task),
        options={k: dict(v) for k, v in spec.options.items()},
        finetune_batches=spec.finetune_batches,
        main_budget=spec.main_budget,  # as the groups spell it
        agent=spec.agent,
        own_evaluations=list(spec.own_evaluations),
    )


def _flag(flag: str, check: Any, value: Any) -> None:
    try:
        check(value)
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None


def _models(spec: PlanFile, narrow: Narrowing) -> dict[str, ModelSpec]:
    """The plan's models, those the command line names (in its order) when it names some."""
    models = {m: s or ModelSpec() for m, s in spec.models.items()}
    wanted = list(narrow.models or [])
    if narrow.slice is not None:
        wanted = [narrow.slice[0]]
    missing = sorted(set(wanted) - set(models))
    if missing:
        flag = "--slice" if narrow.slice is not None else "--models"
        raise ConfigError(f"{flag}: {missing} not in the plan; it has {sorted(models)}")
    return {m: models[m] for m in wanted} if wanted else models


class _Expander:
    """Builds the groups of a plan's models: channel groups, then the granularity groups."""

    def __init__(self, spec: PlanFile, narrow: Narrowing, folder: Path) -> None:
        self.spec, self.narrow, self.folder = spec, narrow, folder
        self.searchers = narrow.searchers or list(spec.searchers)
        self.budgets = narrow.budgets or list(spec.budgets)

    def channel_groups(self, models: dict[str, ModelSpec]) -> list[Group]:
        return [
            self.group(name, model, "channel", budget, tuple(self.searchers))
            for name, model in models.items()
            for budget in self.budgets
        ]

    def extra_groups(self, models: dict[str, ModelSpec]) -> list[Group]:
        if self.narrow.no_extra:
            return []
        out = []
        for extra in self.spec.extra:
            if extra.model not in models or not self._budget_wanted(extra.budget):
                continue
            names = [
                s for s in (extra.searchers if extra.searchers is not None else self.searchers)
                if s in self.searchers
                and not (extra.granularity != "channel" and get_searcher(s).channel_only)
            ]  # fmt: skip
            if names:
                model = models[extra.model]
                out.append(self.group(extra.model, model, extra.granularity, extra.budget,
                                      tuple(names), extra.criterion))  # fmt: skip
        return out

    def _budget_wanted(self, budget: str) -> bool:
        """--budgets narrows the granularity groups too."""
        wanted = self.narrow.budgets
        return not wanted or str(Budget.parse(budget)) in {str(Budget.parse(b)) for b in wanted}

    def group(
        self,
        name: str,
        model: ModelSpec,
        granularity: str,
        budget: str,
        searchers: tuple[str, ...],
        criterion: str | None = None,
    ) -> Group:
        return Group(
            name, granularity, budget, searchers,
            evaluations=self.narrow.evaluations or model.evaluations,
            options=tuple((s, tuple(sorted(o.items()))) for s, o in model.options.items()),
            criterion=criterion,
            seeds=None if self.narrow.seeds or model.seeds is None else tuple(model.seeds),
            checkpoint=self._checkpoint(name, model),
        )  # fmt: skip

    def _checkpoint(self, name: str, model: ModelSpec) -> str | None:
        """A shipped checkpoint (relative to the plan's folder): the same weights on every
        machine, so groups measured on different machines compare and a clone resumes."""
        if not model.checkpoint:
            return None
        path = Path(model.checkpoint)
        path = path if path.is_absolute() else self.folder / path
        if not path.is_file():
            raise ConfigError(f"models.{name}.checkpoint: {path} not found")
        return str(path)


def _selected(groups: list[Group], narrow: Narrowing) -> list[Group]:
    """The groups of the granularities and the slice the command line asks for."""
    if narrow.granularities:
        unknown = sorted(set(narrow.granularities) - set(GRANULARITIES))
        if unknown:
            raise ConfigError(f"--granularities: unknown {unknown}; choose from channel, fine, nm")
        groups = [g for g in groups if g.granularity in narrow.granularities]
    if narrow.slice is not None:
        model, budget = narrow.slice
        _flag("--slice", Budget.parse, budget)
        every = [g.key for g in groups]
        groups = [g for g in groups if g.model == model and _same(g.budget, budget)]
        if not groups:
            raise ConfigError(f"--slice {model} {budget}: no such group; the plan has {every}")
    if not groups:
        raise ConfigError("the benchmark plan has no group (models x budgets) to run")
    return groups


def _same(a: str, b: str) -> bool:
    return Budget.parse(a) == Budget.parse(b)
