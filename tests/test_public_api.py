"""The public API in one import (``import autoprune as ap``): every name the README uses
resolves, and the notebook workflow (own model + data -> search -> compare -> pruned model)
runs through ``ap.*`` alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import autoprune as ap

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 10, 10)


def _documented_names() -> set[str]:
    """Every ``ap.<name>`` in the README and the docs."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return {m for p in texts if p.exists() for m in re.findall(r"\bap\.(\w+)", p.read_text())}


def test_every_documented_name_resolves() -> None:
    names = _documented_names()
    assert {"task_from_module", "search", "compare", "save_pruned"} <= names, names
    missing = sorted(n for n in names if not hasattr(ap, n))
    assert missing == []


@pytest.mark.parametrize("name", sorted(ap.__all__))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(ap, name) is not None


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'prune_everything'"):
        ap.prune_everything  # noqa: B018


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, *SHAPE, generator=gen) + y[:, None, None, None], y


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    config = {"data": {"search_size": 48}, "eval": {"bn_batches": 2, "bn_batch_size": 16}}
    return ap.task_from_module(Net(), train=_data(128, 1), test=_data(48, 2), config=config)


def test_search_result_gives_its_policy_without_the_task(task, tmp_path: Path) -> None:
    result = ap.search("random", task, "flops=0.6", seed=0, evaluations=3)
    policy = result.policy()
    assert policy.ratios == result.best.ratios
    assert policy.fingerprint == task.fingerprint()
    assert policy.budget == {"flops": 0.6} and policy.searcher == "random"
    policy.check(task)  # valid for the task it was found for
    applied = ap.apply_policy(task, policy, finetune_epochs=0, latency=False)
    path = ap.save_pruned(tmp_path / "pruned.pt", task, applied.model, policy)
    loaded, again = ap.load_pruned(path, model=Net())
    x = _data(4, 9)[0]
    assert torch.allclose(loaded.eval()(x), applied.model.eval()(x), atol=1e-5)
    assert again.ratios == policy.ratios


def test_compare_runs_every_searcher_and_seed(task) -> None:
    comparison = ap.compare(task, ["uniform", "random"], "flops=0.6", seeds=[0, 1], evaluations=3)
    assert set(comparison.results) == {("uniform", 0), ("uniform", 1), ("random", 0), ("random", 1)}
    rows = {row["searcher"]: row for row in comparison.table()}
    assert list(rows) == ["uniform", "random"]
    for name, row in rows.items():
        accs = [comparison.results[(name, s)].best.accuracy for s in (0, 1)]
        assert row["accuracy"] == pytest.approx(sum(accs) / 2)
        assert row["seeds"] == 2 and row["flops_ratio"] <= 0.6 + 1e-9
    best = comparison.best
    assert best.best.accuracy == max(r.best.accuracy for r in comparison.results.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"searchers": []}, "non-empty list"),
        ({"searchers": "uniform"}, "non-empty list"),
        ({"searchers": ["uniform", "uniform"]}, "repeated"),
        ({"searchers": ["nope"]}, "unknown searcher 'nope'"),
        ({"searchers": ["ddpg"]}, "needs an evaluation budget"),
        ({"searchers": ["uniform"], "seeds": [0, 0]}, "without repeats"),
        ({"searchers": ["uniform"], "options": {"random": {}}}, "not compared"),
    ],
)
def test_compare_refuses_bad_input_before_searching(task, kwargs, message) -> None:
    searchers = kwargs.pop("searchers")
    with pytest.raises(ap.SearchError, match=message):
        ap.compare(task, searchers, "flops=0.6", **kwargs)
