"""The default task, the evaluator, budgets, policies, apply and the public API's errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import autoprune as ap
from autoprune.apply import load_pruned, save_pruned
from autoprune.costs.counting import measure_macs
from autoprune.data import DataError
from autoprune.models import ModelError
from autoprune.training import evaluate_accuracy, recalibrate_bn


def test_default_task_units_and_accuracy(default_task):
    assert default_task.units[0] == "conv1"
    assert len(default_task.units) == 12
    data = default_task.data
    acc, _ = evaluate_accuracy(default_task.model, data.x_test, data.y_test)
    assert acc >= 0.98


def test_adaptive_bn_recovers_accuracy(default_task):
    """EagleEye: 50% of channels removed uniformly; recalibration adds at least 20 points."""
    task = default_task
    pruned = task.prune(np.full(len(task.units), 0.5))
    before, _ = evaluate_accuracy(pruned, task.data.x_search, task.data.y_search)
    recalibrate_bn(pruned, task.data.x_train, 4, 64)
    after, _ = evaluate_accuracy(pruned, task.data.x_search, task.data.y_search)
    assert after >= before + 0.20


def test_same_seed_same_evaluation(default_task):
    vec = np.random.default_rng(3).uniform(0, 0.8, len(default_task.units))
    a = ap.Evaluator(default_task).evaluate(vec)
    b = ap.Evaluator(default_task).evaluate(vec)
    assert (a.accuracy, a.loss, a.flops_ratio) == (b.accuracy, b.loss, b.flops_ratio)
    assert not a.cached and not b.cached


def test_evaluator_cache_and_dense_model_untouched(default_task):
    before = {k: v.clone() for k, v in default_task.model.state_dict().items()}
    evaluator = ap.Evaluator(default_task)
    vec = np.full(len(default_task.units), 0.3)
    first = evaluator.evaluate(vec)
    again = evaluator.evaluate(vec + 1e-6)  # same channel counts: served from the cache
    assert again.cached and again.accuracy == first.accuracy
    assert first.seconds["total"] > 0 and set(first.seconds) >= {"prune", "recalibrate"}
    after = default_task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_budget_projection_meets_budget(default_task):
    budget = default_task.check_budget("flops=0.25,params=0.5")
    rng = np.random.default_rng(0)
    for _ in range(5):
        vec = default_task.project(rng.uniform(0, 0.8, len(default_task.units)), budget)
        costs = default_task.cost_ratios(vec)
        assert costs["flops"] <= 0.25 + 1e-9 and costs["params"] <= 0.5 + 1e-9
        assert (vec >= 0).all() and (vec <= 0.8 + 1e-12).all()
        pruned = default_task.prune(vec)
        measured = measure_macs(pruned, default_task.input_shape)
        assert measured <= 0.25 * default_task.space.dense_macs * 1.01


def test_unreachable_budget_names_smallest_reachable(default_task):
    with pytest.raises(ap.BudgetError, match=r"smallest reachable is flops=0\.0\d+"):
        default_task.check_budget("flops=0.01")
    with pytest.raises(ap.BudgetError, match="unknown budget metric"):
        ap.Budget.parse("energy=0.5")
    with pytest.raises(ap.BudgetError, match="cannot read budget"):
        ap.Budget.parse("flops")
    with pytest.raises(ap.BudgetError, match=r"budget flops: '0\.5\.5' is not a number"):
        ap.Budget.parse("flops=0.5.5")
    with pytest.raises(ap.BudgetError, match=r"budget flops: 'abc' is not a number"):
        ap.Budget.parse({"flops": "abc"})
    with pytest.raises(ap.BudgetError, match="limits flops twice"):
        ap.Budget.parse("flops=0.5,flops=0.9")  # the last one used to win silently


def test_policy_round_trip_and_refusals(default_task, tmp_path):
    vec = np.linspace(0, 0.8, len(default_task.units))
    policy = ap.Policy.from_task(default_task, vec, metrics={"accuracy": 0.9}, searcher="test")
    path = policy.save(tmp_path / "p.json")
    loaded = ap.Policy.load(path)
    assert loaded == policy
    assert np.allclose(loaded.check(default_task), vec)

    other = json.loads(path.read_text())
    other["fingerprint"]["model"] = "vgg11"
    with pytest.raises(ap.PolicyError, match=r"made for model='vgg11'"):
        ap.Policy.from_dict(other).check(default_task)
    other = json.loads(path.read_text())
    other["ratios"]["layer9.conv"] = 0.1
    with pytest.raises(ap.PolicyError, match="does not have"):
        ap.Policy.from_dict(other).check(default_task)
    other = json.loads(path.read_text())
    other["ratios"]["conv1"] = 0.95
    with pytest.raises(ap.PolicyError, match="outside"):
        ap.Policy.from_dict(other).check(default_task)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ap.PolicyError, match="not valid JSON"):
        ap.Policy.load(tmp_path / "bad.json")


def test_apply_iterative_and_save_load(default_task, tmp_path):
    vec = default_task.project(np.zeros(len(default_task.units)), ap.Budget.parse("flops=0.5"))
    policy = ap.Policy.from_task(default_task, vec)
    result = ap.apply_policy(default_task, policy, finetune_epochs=1, steps=2, latency=False)
    assert len(result.steps) == 2
    assert result.after["macs"] == pytest.approx(default_task.space.costs(vec)[0], rel=0.01)
    assert result.after["test_accuracy"] >= result.pruned_no_finetune["test_accuracy"]
    path = save_pruned(tmp_path / "pruned.pt", default_task, result.model, policy)
    model, loaded = load_pruned(path)
    x = default_task.data.x_test[:32]
    assert torch.allclose(model(x), result.model.eval()(x), atol=1e-5)
    assert loaded.ratios == policy.ratios


def test_apply_times_the_pruned_and_dense_models_together(default_task, monkeypatch):
    """The before / after latencies come from one interleaved timing of the dense model and the
    returned pruned model (a machine whose speed drifts between two timings skews the ratio)."""
    import autoprune.apply

    vec = default_task.project(np.zeros(len(default_task.units)), ap.Budget.parse("flops=0.5"))
    timed: list[list] = []
    real = autoprune.apply.measure_latencies

    def spy(models, *args, **kwargs):
        timed.append(list(models))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(autoprune.apply, "measure_latencies", spy)
    result = ap.apply_policy(default_task, vec, latency=True)
    assert len(timed) == 1
    dense, pruned = timed[0]
    assert dense is default_task.model and pruned is result.model
    assert result.before["latency_ms"] > 0 and result.after["latency_ms"] > 0
    assert result.latency_batch == default_task.config.eval.latency_batch_size


def test_apply_checks_the_budget_against_measured_costs(default_task, monkeypatch):
    """The search budget against the final model's measured costs: MACs and params counted on
    the pruned model itself, latency as timed (here a made-up timing that misses the limit), at
    the batch size of the task's latency budget."""
    import autoprune.apply
    from autoprune.cli.render import budget_lines
    from autoprune.costs.counting import count_params, measure_macs

    vec = default_task.project(np.zeros(len(default_task.units)), ap.Budget.parse("flops=0.5"))
    batches: list[int] = []

    def clock(models, shape, batch_size=1, **kwargs):
        batches.append(batch_size)
        return [0.010, 0.0065]  # dense, pruned: 0.65 of the dense latency

    monkeypatch.setattr(autoprune.apply, "measure_latencies", clock)
    cfg = default_task.config.model_copy(deep=True)
    cfg.eval.latency_batch_size = 8
    monkeypatch.setattr(default_task, "config", cfg)
    result = ap.apply_policy(default_task, vec, latency=True)
    assert batches == [8] and result.latency_batch == 8
    shape = default_task.input_shape
    macs = measure_macs(result.model, shape) / measure_macs(default_task.model, shape)
    params = count_params(result.model) / count_params(default_task.model)
    check = result.budget_check({"flops": 0.5, "params": params - 0.01, "latency": 0.6})
    assert check["flops"]["measured"] == pytest.approx(macs) and check["flops"]["met"]
    assert check["params"]["measured"] == pytest.approx(params) and not check["params"]["met"]
    assert check["latency"] == {"limit": 0.6, "measured": pytest.approx(0.65), "met": False}
    policy = ap.Policy.from_task(default_task, vec, {"latency_ratio": 0.598}, {"latency": 0.6})
    [line] = budget_lines(result, policy)
    assert "0.650" in line and "NOT met" in line and "predicted 0.598" in line
    assert "latency=0.55" in line
    assert result.budget_check(ap.Budget.parse("flops=0.5")) == {"flops": check["flops"]}
    untimed = ap.apply_policy(default_task, vec, latency=False)
    assert untimed.budget_check({"latency": 0.6})["latency"]["met"] is None


def test_apply_scores_the_test_split_once_per_model(default_task, monkeypatch):
    """The dense model is scored once per task, each applied policy once before and once after
    its fine-tune; the reported figures are those of independent passes over the test split."""
    vec = default_task.project(np.zeros(len(default_task.units)), ap.Budget.parse("flops=0.5"))
    calls: list[str] = []
    score = type(default_task).score

    def counting(self, model, split="search"):
        calls.append(split)
        return score(self, model, split)

    monkeypatch.setattr(type(default_task), "score", counting)
    first = ap.apply_policy(default_task, vec, finetune_epochs=1, latency=False)
    calls.clear()
    second = ap.apply_policy(default_task, vec, finetune_epochs=1, latency=False)
    assert calls.count("test") == 2  # pruned before and after the fine-tune; the dense: reused
    monkeypatch.undo()
    assert second.before == first.before
    assert second.before["test_accuracy"] == default_task.score(default_task.model, "test")[0]
    assert second.after["test_accuracy"] == default_task.score(second.model, "test")[0]
    assert second.steps[-1]["test_accuracy"] == second.after["test_accuracy"]


@pytest.mark.parametrize("granularity", ["fine", "nm"])
def test_masked_granularities_evaluate(granularity: str):
    task = ap.build_task(overrides=[f"granularity={granularity}", "criterion=magnitude"])
    vec = np.full(len(task.units), 0.5)
    result = ap.Evaluator(task).evaluate(vec)
    assert result.flops_ratio == pytest.approx(0.5, abs=0.02)
    assert result.accuracy > 0.5


def test_bad_input_errors_before_work(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'resnet99'"):
        ap.build_task(overrides=["model.name=resnet99"])
    with pytest.raises(DataError, match="does not exist"):
        ap.build_task(overrides=["data.name=cifar10", f"data.path={tmp_path / 'nope'}"])
    with pytest.raises(ap.ConfigError, match=r"data\.path is required"):
        ap.build_task(overrides=["data.name=npz"])
    with pytest.raises(ap.ConfigError, match="colour"):
        ap.build_task({"colour": "red"})
    with pytest.raises(ValueError, match="unknown criterion"):
        ap.build_task(overrides=["criterion=l7"])
    with pytest.raises(ModelError, match="checkpoint not found"):
        ap.build_task(overrides=[f"model.checkpoint={tmp_path / 'x.pt'}"])
    bad = tmp_path / "vgg.pt"
    torch.save(ap.build_task().model.state_dict(), bad)
    with pytest.raises(ModelError, match="missing keys"):
        ap.build_task(overrides=["model.name=vgg11", f"model.checkpoint={bad}"])


def test_yaml_config(tmp_path):
    cfg = tmp_path / "task.yaml"
    cfg.write_text("model:\n  name: resnet20\ngranularity: channel\ncriterion: l1\n")
    assert ap.task_config(cfg).criterion == "l1"
    cfg.write_text("model: [unclosed\n")
    with pytest.raises(ap.ConfigError, match="malformed YAML"):
        ap.task_config(cfg)


def test_a_latency_that_is_not_monotone_in_the_ratios_is_still_reached(default_task, monkeypatch):
    """Measured latency can rise again at the widest cuts; reachability and projection must not
    assume that the most pruned policy is the fastest."""
    import types

    def cost_ratios(self, vec, metrics=("flops",)):
        m = float(np.mean(vec)) / self.space.max_ratio  # 0 dense .. 1 every unit at max
        latency = 1.0 - 0.6 * m if m <= 0.5 else 0.7 + 0.4 * (m - 0.5)  # fastest half way
        return {"latency": latency, "flops": 1.0 - 0.5 * m}

    task = copy.copy(default_task)
    task.__dict__.pop("_budget_targets", None)  # the shared fixture's cache is not ours
    monkeypatch.setattr(task, "cost_ratios", types.MethodType(cost_ratios, task))
    budget = task.check_budget("latency=0.75")  # the all-max policy is at 0.9: not the floor
    vec = task.project(np.zeros(len(task.space)), budget)
    assert budget.met_by(task.cost_ratios(vec, budget.metrics))
    with pytest.raises(ap.BudgetError, match=r"smallest reachable is latency=0\.7\d+"):
        task.check_budget("latency=0.6")
