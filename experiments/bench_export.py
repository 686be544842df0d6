"""Export of dense and pruned zoo models to ONNX, and their latency in PyTorch and ONNX Runtime.

For each shipped Fashion-MNIST checkpoint (1x28x28), dense and pruned with every channel unit
at one ratio (default 0.5; channels chosen by L2 norm, the task default): the ONNX export time
(``autoprune.export``), the max abs and relative error of ONNX Runtime against PyTorch on 64
random inputs, the MACs ratio, and the median latency of PyTorch eager and of ONNX Runtime (CPU
provider, all graph optimisations) at batch 1 and 64 on one thread, dense and pruned timed in
interleaved rounds. Writes experiments/results/export.md (the table, command and date); the
figures are quoted in docs/results/latency.md.

    python experiments/bench_export.py [--ratio 0.5] [--repeats 30] [--models resnet20,...]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from autoprune.costs.counting import measure_macs
from autoprune.engine.criteria import CriterionContext, compute_scores
from autoprune.engine.pruning import Ranking, prune_model
from autoprune.engine.space import PruningSpace
from autoprune.export import export
from autoprune.models import build_model, load_checkpoint

HERE = Path(__file__).resolve().parent
SHAPE = (1, 28, 28)
MODELS = ("resnet20", "resnet56", "vgg11", "mobilenetv2")


def pruned_copy(model: nn.Module, ratio: float) -> nn.Module:
    space = PruningSpace(model, SHAPE, "channel")
    x, y = torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long)  # l2 reads weights only
    scores = compute_scores("l2", CriterionContext(model, space, x, y))
    vec = np.full(len(space), min(ratio, space.max_ratio))
    return prune_model(model, space, Ranking.from_scores(space, scores), vec).eval()


def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(calls: list, repeats: int, warmup: int = 5) -> list[float]:
    """Median seconds of each call, timed in rounds (each call once per round, warm)."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(warmup):
        for call in calls:
            call()
    for _ in range(repeats):
        for i, call in enumerate(calls):
            call()  # warm right before its own timing
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(name: str, ratio: float, repeats: int, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    dense = load_checkpoint(
        build_model(name, 1, 10), HERE / "checkpoints" / f"{name}-fashion_mnist.pt"
    )
    dense = dense.eval()
    models = {"dense": dense, f"pruned {ratio:g}": pruned_copy(dense, ratio)}
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(0))
    rows, sessions = [], {}
    for label, model in models.items():
        result = export(
            model, folder / f"{name}-{label.split()[0]}.onnx", example_input=x[:1], inputs=x
        )
        sessions[label] = ort_session(result.path)
        rows.append({
            "model": name, "variant": label, "macs": measure_macs(model, SHAPE),
            "export_s": result.seconds, "max_abs_error": result.max_abs_error,
            "max_rel_error": result.max_rel_error,
        })  # fmt: skip
    for batch in (1, 64):
        xb = x[:batch]
        calls = []
        for label, model in models.items():
            feed = {"input": xb.numpy()}
            calls.append(lambda m=model, xb=xb: m(xb))
            calls.append(lambda s=sessions[label], feed=feed: s.run(None, feed))
        with torch.no_grad():
            medians = interleaved(calls, repeats)
        for i, row in enumerate(rows):
            row[f"torch_ms_b{batch}"] = 1e3 * medians[2 * i]
            row[f"ort_ms_b{batch}"] = 1e3 * medians[2 * i + 1]
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | variant | MACs ratio | export s | ORT max abs err | ORT max rel err | "
            "torch ms b1 | ORT ms b1 | torch ms b64 | ORT ms b64 | speedup torch b1 / b64 | "
            "speedup ORT b1 / b64 |")  # fmt: skip
    out = [head, "|" + "---|" * 12]
    dense: dict[str, dict] = {}
    for r in rows:
        d = dense.setdefault(r["model"], r)

        def sp(key: str, d: dict = d, r: dict = r) -> float:
            return d[key] / r[key]

        out.append(
            f"| {r['model']} | {r['variant']} | {r['macs'] / d['macs']:.3f} | "
            f"{r['export_s']:.1f} | "
            f"{r['max_abs_error']:.1e} | {r['max_rel_error']:.1e} | {r['torch_ms_b1']:.2f} | "
            f"{r['ort_ms_b1']:.2f} | {r['torch_ms_b64']:.1f} | {r['ort_ms_b64']:.1f} | "
            f"{sp('torch_ms_b1'):.2f} / {sp('torch_ms_b64'):.2f} | "
            f"{sp('ort_ms_b1'):.2f} / {sp('ort_ms_b64'):.2f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "export.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows += measure(name, args.ratio, args.repeats, Path(folder))
            print(table(rows), flush=True)
    command = f"python experiments/bench_export.py --ratio {args.ratio} --repeats {args.repeats}"
    versions = f"torch {torch.__version__}, onnxruntime {ort.__version__}, 1 thread"
    text = f"# Export and runtime latency\n\n`{command}` ({datetime.date.today()}, {versions})\n\n"
    text += table(rows)
    args.out.write_text(text)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
