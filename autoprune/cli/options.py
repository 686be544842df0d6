"""The CLI's shared arguments and options (typer annotations) and how they become a config:
positional ``key=value`` overrides, the experiment flags, output paths checked before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigArg = Annotated[
    str | None, typer.Argument(help="Task config YAML (default: the embedded digits task).")
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. model.name=vgg11.")
]
SearcherOpt = Annotated[str | None, typer.Option(help="Searcher (ddpg, netadapt, random, ...).")]
SearchersOpt = Annotated[
    str | None, typer.Option(help="Comma-separated, e.g. ddpg,netadapt,uniform,random.")
]
BudgetOpt = Annotated[str | None, typer.Option(help="Budget, e.g. flops=0.25 or params=0.5.")]
EvalsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Evaluations per search: the budget of ddpg / random (default 300), a limit for "
        "netadapt / sensitivity; uniform and global evaluate one policy.",
    ),
]
WorkersOpt = Annotated[int | None, typer.Option(min=0, help="Ray workers (0: this process).")]
AddressOpt = Annotated[
    str | None, typer.Option(help="Join a Ray cluster: auto, host:port or ray://host:port.")
]
UriOpt = Annotated[
    str | None, typer.Option(help="MLflow tracking URI (default sqlite:///mlflow.db here).")
]
ExperimentOpt = Annotated[str | None, typer.Option(help="MLflow experiment name.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed (one search per seed with --seeds).")]
SeedsOpt = Annotated[str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")]
OutOpt = Annotated[Path, typer.Option(help="Where to save the best policy (JSON).")]
ApplyOpt = Annotated[
    Path | None,
    typer.Option(
        "--apply",
        help="Then prune with the best policy, fine-tune (--apply-epochs) and save the model here.",
    ),
]
ApplyEpochsOpt = Annotated[int, typer.Option(min=0, help="Fine-tune epochs for --apply.")]


def split_config(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """A first positional that looks like key=value is an override, not a config file."""
    items = list(overrides or [])
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *items]
    return config, items


def names(text: str | None) -> list[str] | None:
    """The items of a comma-separated option (None when it is not given)."""
    return [n for n in text.split(",") if n.strip()] if text is not None else None


def writable(path: Path | None, option: str) -> None:
    """Refuse an output path that cannot be written, before any search or training starts."""
    if path is None:
        return
    if path.is_dir():
        example = path / "pruned.pt"
        raise ValueError(f"{option} {path} is a folder; give a file path, e.g. {example}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable")


def experiment_cfg(
    config: str | None,
    overrides: list[str] | None,
    searchers: list[str] | None = None,
    budget: str | None = None,
    evaluations: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    seed: int | None = None,
    seeds: str | None = None,
    finetune_epochs: int | None = None,
) -> Any:
    """The experiment config: YAML + key=value overrides + the command's options (last wins)."""
    from autoprune.runner.config import experiment_config

    cfg_path, items = split_config(config, overrides)
    flags: dict[str, Any] = {
        "search.searchers": searchers,
        "search.budget": budget,
        "search.evaluations": evaluations,
        "search.workers": workers,
        "search.ray_address": ray_address,
        "tracking.uri": tracking_uri,
        "tracking.experiment": experiment,
        "search.finetune_epochs": finetune_epochs,
    }
    if seeds is not None:
        try:
            flags["search.seeds"] = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    elif seed is not None:
        flags["search.seeds"] = [seed]
    extra = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return experiment_config(cfg_path, [*items, *extra])
