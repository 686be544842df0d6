"""experiments/ship_checkpoints.py: the plan's checkpoints, trained and copied where it ships."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from experiment_scripts import load

ship = load("ship_checkpoints")


@pytest.fixture
def plan(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"task": {"data": {"name": "digits"},
                                             "eval": {"search_images": 100}},
                                    "models": {"plain20": {"evaluations": 4}}}))  # fmt: skip
    return path


def test_trains_the_plans_checkpoint_and_ships_a_copy_that_scores_as_recorded(plan, tmp_path):
    from autoprune.config import DataConfig
    from autoprune.data import load_data
    from autoprune.models import build_model
    from autoprune.training import evaluate_accuracy

    out = tmp_path / "ship"
    args = ["--plan", str(plan), "--out", str(out), "--set", "train.epochs=1", "--threads", "1"]
    assert ship.main(args) == 0
    shipped = out / "plain20-digits.pt"
    (cached,) = (tmp_path / "cache").glob("plain20-digits-*.pt")
    assert shipped.read_bytes() == cached.read_bytes()
    payload = torch.load(shipped, weights_only=True)
    meta = json.loads(payload["meta"])
    assert meta["train"]["epochs"] == 1  # the override reached the recipe
    # the shipped weights, loaded into a fresh model, score the recorded test accuracy
    data = load_data(DataConfig())
    model = build_model("plain20", data.in_channels, data.num_classes)
    model.load_state_dict(payload["state_dict"])
    accuracy, _ = evaluate_accuracy(model, data.test.x, data.test.y)
    assert accuracy == pytest.approx(meta["test_acc"], abs=1e-6)

    # a shipped file is not replaced unless asked: recorded benchmark groups name it
    before = shipped.read_bytes()
    assert ship.main(args) == 2
    assert shipped.read_bytes() == before
    assert ship.main([*args, "--force"]) == 0  # from the cache now: the same bytes
    assert shipped.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--models", "resnet99"], "not zoo models: resnet99"),
        (["--set", "train.epochs=0"], "epochs"),
    ],
)
def test_bad_input_is_refused_before_any_training(plan, tmp_path, capsys, extra, message):
    assert ship.main(["--plan", str(plan), "--out", str(tmp_path / "ship"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))


def test_a_plan_whose_models_all_ship_has_nothing_to_do(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"models": {"resnet20": {"checkpoint": "x.pt"}}}))
    assert ship.main(["--plan", str(path), "--out", str(tmp_path / "ship")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not (tmp_path / "ship").exists()
