"""experiments/bench_search.py (issue 16's quality bar): its verdicts on made-up rows, and the
process-pool runner on a tiny digits run (rows, tables, curves, resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from experiment_scripts import load

ROOT = Path(__file__).resolve().parents[1]


bs = load("bench_search")


def _rows(searcher: str, before: list[float], after: float = 0.9) -> list[dict]:
    return [
        {"budget": "flops=0.5", "searcher": searcher, "seed": s, "test_before": b,
         "test_after": after, "best_search": b, "history": [[1.0, b, True]], "wall": 1.0}
        for s, b in enumerate(before)
    ]  # fmt: skip


def _verdict_lines(rows: list[dict]) -> dict[str, str]:
    lines = bs.verdict(rows)
    keys = {"best other": "best other", "`random`": "lead over `random`",
            "`evolution`": "lead over `evolution`"}  # fmt: skip
    return {key: next(line for line in lines if text in line) for key, text in keys.items()}


def test_a_lead_inside_the_seed_spread_is_not_a_win():
    # ddpg leads evolution by 2 points on average, but evolution's seeds spread by 4
    rows = _rows("ddpg", [0.70, 0.72, 0.74]) + _rows("evolution", [0.65, 0.70, 0.75])
    rows += _rows("random", [0.50, 0.51, 0.52])
    lines = _verdict_lines(rows)
    assert "**met**" in lines["best other"]  # the highest mean...
    assert "**missed**" in lines["`evolution`"]  # ...but not by more than the spread
    assert "**met**" in lines["`random`"]  # 20 points against a spread of under 1


def test_a_lead_beyond_the_spread_wins_and_one_seed_never_does():
    rows = _rows("ddpg", [0.80, 0.81, 0.82]) + _rows("evolution", [0.70, 0.71, 0.72])
    assert "**met**" in _verdict_lines(rows + _rows("random", [0.5]))["`evolution`"]
    one = _rows("ddpg", [0.9]) + _rows("evolution", [0.5]) + _rows("random", [0.5])
    assert "**missed**" in _verdict_lines(one)["`evolution`"]


def test_fine_tune_targets_use_the_fine_tuned_accuracy():
    rows = _rows("ddpg", [0.8, 0.8], after=0.905) + _rows("uniform", [0.4], after=0.90)
    rows += _rows("global", [0.5], after=0.908)
    lines = bs.verdict(rows)
    gap = next(line for line in lines if "at most 0.2 points" in line)
    assert "+0.30 points" in gap and "**missed**" in gap
    uni = next(line for line in lines if "`uniform`" in line)
    assert "+0.50 points" in uni and "**met**" in uni


def test_rows_without_a_fine_tune_check_no_fine_tune_target_and_show_no_ft_column():
    rows = _rows("ddpg", [0.8, 0.8], after=0.8) + _rows("uniform", [0.4], after=0.4)
    for r in rows:
        r["finetune"] = {"epochs": 0, "batches": None}
    lines = bs.verdict(rows)
    assert any("without fine-tuning" in line and "**met**" in line for line in lines)
    assert not any("at most 0.2 points" in line or "above `uniform`" in line for line in lines)
    assert any("not every row was fine-tuned" in line for line in lines)
    for r in rows:
        r.update(last50=r["test_before"], flops=0.5, evaluations=1, partial=0)
    ddpg_line = next(line for line in bs.table(rows).splitlines() if line.startswith("| ddpg "))
    cells = [c.strip() for c in ddpg_line.split("|")]
    assert cells[4] == "80.0 ± 0.0" and cells[5] == "-"  # no FT shown, FT column empty


def test_best_so_far_ignores_partial_and_over_budget_evaluations():
    row = {"history": [[0.1, 0.5, False], [0.2, 0.3, True], [0.3, 0.9, False], [0.4, 0.4, True]]}
    curve = bs.best_so_far(row)
    assert curve[0] != curve[0]  # nan before the first full, within-budget evaluation
    assert curve[1:] == [0.3, 0.3, 0.4]
    assert bs.best_within(row, 0.35) == 0.3


@pytest.mark.slow
def test_pool_runner_writes_rows_tables_and_curves_and_resumes(tmp_path):
    out = tmp_path / "pool"
    cmd = [
        sys.executable, str(ROOT / "experiments" / "bench_search_pool.py"), "--data", "digits",
        "--processes", "2", "--budgets", "flops=0.5", "--searchers", "ddpg", "random",
        "uniform", "--variant", "ddpg=ddpg:warmup_episodes=2", "--seeds", "0", "1",
        "--evaluations", "4", "--out", str(out),
    ]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    # uniform is deterministic: first seed only
    assert sorted((r["searcher"], r["seed"]) for r in rows) == [
        ("ddpg", 0), ("ddpg", 1), ("random", 0), ("random", 1), ("uniform", 0)
    ]  # fmt: skip
    for r in rows:
        assert r["flops"] <= 0.5 + 1e-9 and 0 <= r["test_before"] <= 1
        assert r["evaluations"] == (1 if r["searcher"] == "uniform" else 4)
        assert r["best_ratios"] and all(0 <= v <= 0.8 for v in r["best_ratios"].values())
    assert "| ddpg | 2 |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "pool_curves.png").stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 searches on 2 processes" in again.stdout
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == len(rows)
    # every row names the model it searched: one digest, the digits checkpoint's
    from autoprune import build_task

    digest = build_task(None, ["data.name=digits"]).checkpoint_hash
    assert {r["checkpoint"] for r in rows} == {digest}
    assert "Checkpoint: " + digest in out.with_suffix(".md").read_text()
    # a file measured on another model is refused before anything runs, and kept as it was
    log = out.with_suffix(".jsonl")
    log.write_text(
        log.read_text() + json.dumps({**rows[0], "seed": 9, "checkpoint": "0ther"}) + "\n"
    )
    kept = log.read_text()
    refused = subprocess.run([*cmd, "--seeds", "0", "1", "2"], capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert refused.returncode != 0
    assert "checkpoint 0ther" in refused.stderr and "another --out" in refused.stderr
    assert log.read_text() == kept


def test_the_shipped_checkpoint_is_used_unless_one_is_named():
    shipped = bs.with_shipped_checkpoint("resnet20", "fashion_mnist", ["eval.search_images=9"])
    (named,) = [o for o in shipped if o.startswith("model.checkpoint=")]
    path = Path(named.split("=", 1)[1])
    assert path.is_file() and path.parent.name == "checkpoints"
    own = ["model.checkpoint=mine.pt"]
    assert bs.with_shipped_checkpoint("resnet20", "fashion_mnist", own) == own
    assert bs.with_shipped_checkpoint("plain20", "digits", []) == []  # none ships: the cache's


def test_rows_of_another_checkpoint_are_refused_and_the_note_counts_each_source(tmp_path):
    log = tmp_path / "rows.jsonl"
    rows = [{"checkpoint": "aaa", "revision": "r1"}, {"checkpoint": "aaa", "revision": "r2"}, {}]
    bs.check_checkpoint(rows, "aaa", log)  # the same model, and a row that predates digests
    with pytest.raises(SystemExit, match=r"checkpoint aaa, this run's model is bbb"):
        bs.check_checkpoint(rows, "bbb", log)
    note = bs.provenance_note(rows)
    assert note == (
        "Checkpoint: aaa (2 rows), not recorded (1 rows). "
        "Code: r1 (1 rows), r2 (1 rows), not recorded (1 rows)."
    )
