"""The CLI answers --help, ``best``, ``runs`` and ``compare --recorded`` without the heavy
libraries: checked on what a fresh interpreter has imported, not on a timing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "sklearn", "ray", "mlflow", "stable_baselines3", "gymnasium", "matplotlib")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return {name.split(".")[0] for name in json.loads(out.splitlines()[-1])}


@pytest.mark.parametrize(
    "code",
    [
        "import autoprune.cli",
        "import autoprune",
        # what `best` / `runs` / `compare --recorded` load before answering from sqlite
        "import autoprune.cli, autoprune.tracking.reader, autoprune.policy",
    ],
)
def test_nothing_heavy_is_imported(code: str) -> None:
    assert not imported_after(code) & set(HEAVY)


def test_the_public_api_still_resolves_lazily() -> None:
    import autoprune

    assert autoprune.build_task.__module__ == "autoprune.task"
    assert "Evaluator" in dir(autoprune)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        autoprune.nope  # noqa: B018
