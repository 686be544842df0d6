"""Channel pruning on the standard vision architectures, as a new user would try them (issue 13).

Takes torchvision's model definitions (random weights, 10 classes, 3x32x32 input) and, for each
of 24 architectures: builds the channel pruning space, runs the build-time equivalence check
(where it refuses units, keeps them out and builds again, as ``ignore_unsupported`` does, and
reports what is left), then prunes random policies at three budget levels and a uniform policy
projected onto ``flops<=0.5``, reporting the largest masking-equivalence error (absolute),
whether analytic and measured MACs / params agree, and the checkpoint round trip (state-dict
metadata kept).

torchvision is not a dependency of autoprune (its wheel's compiled ops do not load with the
pinned torch build) and nothing here is part of the test suite. To run it, unpack a torchvision
wheel's pure-Python model definitions somewhere and put that folder on PYTHONPATH:

    PYTHONPATH=/path/to/torchvision-site python experiments/check_torchvision.py
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from autoprune.budget import Budget
from autoprune.costs.measure import count_params, measure_macs
from autoprune.engine.equivalence import masked_reference, verify_channel_pruning
from autoprune.models import load_checkpoint
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace, SpaceError

ARCHITECTURES = [
    "resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small",
    "efficientnet_b0", "vgg11_bn", "densenet121", "googlenet", "resnext50_32x4d",
    "regnet_y_400mf", "convnext_tiny", "mnasnet0_5", "squeezenet1_0", "shufflenet_v2_x0_5",
    "resnet34", "vgg16_bn", "mobilenet_v3_large", "efficientnet_v2_s", "regnet_x_400mf",
    "mnasnet1_0", "shufflenet_v2_x1_0", "swin_t", "vit_b_16",
]  # fmt: skip
KWARGS = {"googlenet": {"aux_logits": False}, "vit_b_16": {"image_size": 32}}
SHAPE = (3, 32, 32)


def _build(name: str) -> torch.nn.Module:
    import torchvision.models as tvm

    kwargs = {**KWARGS.get(name, {}), **({"init_weights": True} if name == "googlenet" else {})}
    torch.manual_seed(0)
    return getattr(tvm, name)(num_classes=10, **kwargs).eval()


def _abs_error(model, space, ranking, ratios, x) -> float:
    pruned = prune_model(model, space, ranking, ratios, light=True)
    ref = masked_reference(model, space, ranking, space.removed_counts(ratios))
    with torch.no_grad():
        return float((pruned(x) - ref(x)).abs().max())


def check(name: str) -> str:
    import torchvision.models as tvm

    model = _build(name)
    with tempfile.TemporaryDirectory() as tmp:  # checkpoint round trip with metadata
        torch.save(model.state_dict(), Path(tmp) / "w.pt")
        load_checkpoint(
            getattr(tvm, name)(num_classes=10, **KWARGS.get(name, {})),
            Path(tmp) / "w.pt",
        )
    ignore: list[str] = []
    while True:  # as ignore_unsupported: keep the refused units out and build again
        t0 = time.perf_counter()
        try:
            space = PruningSpace(model, SHAPE, "channel", ignore=ignore)
            t1 = time.perf_counter()
            verify_channel_pruning(model, space)
            break
        except SpaceError as err:
            if not err.units or set(err.units) <= set(ignore):
                return f"| {name} | refused | {str(err)[:220]} |"
            ignore += [u for u in err.units if u not in ignore]
    t2 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = torch.randn(2, *SHAPE)
    worst, exact = 0.0, True
    policies = [rng.uniform(0, lv * space.max_ratio, len(space)) for lv in (0.25, 0.5, 1.0)]
    budget = Budget.parse("flops=0.5")
    max_vec = np.full(len(space), space.max_ratio)
    policies.append(budget.project(space.cost_ratios, np.full(len(space), 0.2), max_vec))
    for ratios in policies:
        ranking = Ranking.from_scores(space, [rng.random(u.size) for u in space.units])
        worst = max(worst, _abs_error(model, space, ranking, ratios, x))
        pruned = prune_model(model, space, ranking, ratios)
        macs, params = space.costs(ratios)
        exact &= measure_macs(pruned, SHAPE) == round(macs) and count_params(pruned) == params
    flops = space.cost_ratios(policies[-1])["flops"]
    status = f"partly ({len(ignore)} units refused)" if ignore else "supported"
    return (
        f"| {name} | {status} | {len(space)} units, space {t1 - t0:.2f} s, check "
        f"{t2 - t1:.2f} s, max abs error {worst:.1e}, analytic = measured: "
        f"{'yes' if exact else 'NO'}, flops<=0.5 policy at {flops:.3f} |"
    )


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or ARCHITECTURES
    print("| architecture | result | details |\n|---|---|---|")
    for name in names:
        try:
            print(check(name), flush=True)
        except Exception as exc:  # report and go on: this is a survey
            last = traceback.format_exc().strip().splitlines()[-1]
            print(f"| {name} | ERROR | {type(exc).__name__}: {last[:200]} |", flush=True)


if __name__ == "__main__":
    main()
