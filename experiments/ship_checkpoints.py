"""Train the benchmark plan's default checkpoints and copy them where the plan ships them.

Two trainings by the same recipe on different machines are different models (ResNet-20 on
Fashion-MNIST: 92.68% and 92.60% test accuracy, 42% and 69% search accuracy for the uniform
policy at FLOPs 0.5), so the published benchmark names one checkpoint file per model
(``models.<name>.checkpoint`` in ``benchmark.yaml``) and every machine measures those weights.
This script makes those files: for each model it trains (or takes from the cache) the default
checkpoint of the plan's task (:func:`autoprune.training.default_checkpoint`: the data set's and
model's training defaults, the same file name hash as any other use) and copies it to
``<out>/<model>-<data>.pt``. ``--device cuda`` trains on a GPU; the file it writes loads on CPU.

    python experiments/ship_checkpoints.py              # every model of the plan without a file
    python experiments/ship_checkpoints.py --models resnet56,vgg11,mobilenetv2 \
        --set train.epochs=8 --device cuda --force      # how the shipped files were made

A file already in ``--out`` is refused unless ``--force``: a benchmark's records name those
weights, and ``--resume`` refuses to mix them with others.

Then name the file in the plan (``checkpoint: checkpoints/<model>-<data>.pt``). Not a
measurement: what it makes are the weights in ``experiments/checkpoints/``, and it prints each
one's test and search accuracy (those of the shipped files are in ``benchmark.yaml``'s comments).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--plan", type=Path, default=HERE / "benchmark.yaml")
    p.add_argument("--models", type=_csv, help="comma-separated (default: the plan's models "
                   "that name no checkpoint)")  # fmt: skip
    p.add_argument("--out", type=Path, default=HERE / "checkpoints")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="replace files already in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="task config override, e.g. train.epochs=8 (another recipe: another "
                   "cache file)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from autoprune.config import ConfigError, load_yaml, task_config
    from autoprune.data import DataError
    from autoprune.models import MODELS
    from autoprune.training import cache_dir_default, checkpoint_key, default_checkpoint

    try:
        plan = load_yaml(args.plan)
    except (ConfigError, OSError) as err:
        print(f"error: plan {args.plan}: {err}", file=sys.stderr)
        return 2
    specs = plan.get("models") or {}
    models = args.models or [m for m, s in specs.items() if not (s or {}).get("checkpoint")]
    if not models:
        print(f"nothing to do: every model of {args.plan} names a checkpoint "
              "(--models picks some to train again)")  # fmt: skip
        return 0
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: not zoo models: {', '.join(unknown)} (zoo: {', '.join(sorted(MODELS))})",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    configs = {}
    for name in models:  # every config validated before any training
        task = dict(plan.get("task") or {})
        task["model"] = {**(task.get("model") or {}), "name": name}
        task.pop("eval", None)  # evaluation settings do not touch the checkpoint
        try:
            configs[name] = task_config(task, args.overrides)
        except ConfigError as err:
            print(f"error: {name}: {err}", file=sys.stderr)
            return 2
    targets = {name: args.out / f"{name}-{cfg.data.name}.pt" for name, cfg in configs.items()}
    present = [str(t) for t in targets.values() if t.exists()]
    if present and not args.force:  # shipped weights are what recorded benchmark groups used
        print(f"error: already there: {', '.join(present)} (a benchmark's records name these "
              "weights; --force replaces them)", file=sys.stderr)  # fmt: skip
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        key = checkpoint_key(name, cfg.data, cfg.train, cfg.model.kwargs)
        cached = (cache_dir_default() / f"{name}-{cfg.data.name}-{key}.pt").is_file()
        try:
            path = default_checkpoint(name, cfg.data, cfg.train, model_kwargs=cfg.model.kwargs,
                                      device=args.device, progress=True)  # fmt: skip
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        meta = json.loads(torch.load(path, weights_only=True)["meta"])
        shutil.copyfile(path, targets[name])
        how = "from the cache" if cached else f"trained on {args.device}"
        print(f"{name}: {targets[name]} ({how}: {path.name}); test accuracy "
              f"{meta['test_acc']:.4f}, search accuracy {meta['search_acc']:.4f}, "
              f"{cfg.train.epochs} epochs, {meta['seconds']:.0f} s of training; this run "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
