"""Two minimal reproductions of torch-pruning 1.6.1 producing a wrong model (issue 13).

1. ``torch.chunk``: removing an output channel in the first half of a split conv takes the input
   channel from the consumer of the *second* half.
2. Grouped convolution: ``prune_conv_in_channels`` keeps the first group's kept positions for
   every group, so removing input 1 (group 0) and input 2 (group 1) computes another function.

autoprune cuts layers with its own surgery (grouped convs per group) and refuses what the tracer
maps wrongly (its build-time masking-equivalence check); this script shows why. Rerun it when
torch-pruning is upgraded: it prints whether each fault is still there. What it printed for
1.6.1 is recorded in ``docs/architectures.md`` ("Which architectures channel pruning handles").

    python experiments/torch_pruning_repro.py
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.left = nn.Conv2d(2, 3, 1)
        self.right = nn.Conv2d(2, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.conv(x), 2, dim=1)
        return self.left(a).sum() + self.right(b).sum()


def main() -> None:
    m = Split()
    graph = tp.DependencyGraph().build_dependency(m, torch.zeros(1, 1, 4, 4))
    graph.get_pruning_group(m.conv, tp.prune_conv_out_channels, [0]).prune()  # feeds `left`
    print(
        f"chunk: left.in_channels={m.left.in_channels} right.in_channels="
        f"{m.right.in_channels} (expected 1 and 2)"
    )

    g = nn.Conv2d(4, 2, 1, groups=2, bias=False)  # group 0 reads inputs 0-1, group 1 inputs 2-3
    x = torch.randn(1, 4, 1, 1)
    masked = x.clone()
    masked[:, [1, 2]] = 0
    with torch.no_grad():
        ref = g(masked)
        tp.prune_conv_in_channels(g, [1, 2])
        err = float((g(x[:, [0, 3]]) - ref).abs().max())
    print(f"grouped conv: max |pruned - masked| = {err:.3f} (expected 0)")


if __name__ == "__main__":
    main()
