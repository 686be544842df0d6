"""Tests of autoprune.costs: MACs and parameters (counting), measured latency (latency) and the
latency lookup table (table)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from autoprune.costs.counting import count_params, measure_macs
from autoprune.costs.latency import measure_latencies, measure_latency
from autoprune.costs.table import LatencyTable


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest and steadiest on one thread, above all on a shared CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_cnn() -> nn.Sequential:
    """Conv-BN-ReLU, a depthwise conv, a pointwise conv and a Linear classifier, for (1, 8, 8)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class TinyResNet(nn.Module):
    """A stem and one residual block; ``width`` scales every channel count (names stay)."""

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.relu0 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu0(self.bn0(self.stem(x)))
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)) + x)
        return self.fc(torch.flatten(self.pool(out), 1))


RES_SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def res_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[LatencyTable, Path, float]:
    """The tiny ResNet's table, its cache folder and how long the (uncached) build took."""
    folder = tmp_path_factory.mktemp("latency")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    table = LatencyTable.build(TinyResNet(), RES_SHAPE, grid=4, repeats=20, cache_dir=folder)
    elapsed = time.perf_counter() - start
    torch.set_num_threads(previous)
    return table, folder, elapsed


# ------------------------------------------------------------------------------------ MACs


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        # 9x9 input, pad 1, stride 2 -> 5x5 outputs; each does 16 x 3 x 3 x 3 MACs.
        (nn.Conv2d(3, 16, 3, stride=2, padding=1), (3, 9, 9), 25 * 16 * 3 * 9),
        # depthwise: one 3x3 filter per channel at each of 8x8 positions.
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 8, 8), 64 * 8 * 9),
        (nn.Linear(20, 7), (20,), 20 * 7),
        (nn.Linear(20, 7), (5, 20), 5 * 20 * 7),  # a linear layer runs once per input row
    ],
    ids=["conv3x3-stride2-pad1", "depthwise", "linear", "linear-rows"],
)
@pytest.mark.parametrize("nonzero_only", [False, True])
def test_macs_of_single_layers(
    layer: nn.Module, shape: tuple[int, ...], expected: int, nonzero_only: bool
) -> None:
    assert measure_macs(layer, shape, nonzero_only=nonzero_only) == expected


def test_macs_of_a_network_sum_its_conv_and_linear_layers() -> None:
    expected = 64 * 8 * 9 + 16 * 8 * 9 + 16 * 16 * 8 + 16 * 10  # BN, ReLU, pooling: not counted
    assert measure_macs(small_cnn(), (1, 8, 8)) == expected
    assert measure_macs(small_cnn(), (1, 8, 8), nonzero_only=True) == expected


def _zero_half(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.view(-1)[::2] = 0.0


def _prune_half(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            prune.l1_unstructured(m, "weight", amount=0.5)


@pytest.mark.parametrize("sparsify", [_zero_half, _prune_half], ids=["zeroed", "prune-reparam"])
def test_nonzero_macs_of_half_sparse_model_are_half(sparsify) -> None:
    model = small_cnn()
    dense = measure_macs(model, (1, 8, 8))
    sparsify(model)
    assert measure_macs(model, (1, 8, 8)) == dense  # the dense count ignores zeros
    assert abs(measure_macs(model, (1, 8, 8), nonzero_only=True) - dense / 2) <= 64


def test_measure_macs_leaves_model_mode_and_state_unchanged() -> None:
    model = small_cnn()
    _prune_half(model)
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before = copy.deepcopy(model.state_dict())
    measure_macs(model, (1, 8, 8), nonzero_only=True)
    assert model.training and not model[1].training and model[4].training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hasattr(model[0], "weight_orig")  # the reparametrisation is still there


# ------------------------------------------------------------------------------------ params


def test_count_params_with_and_without_zeros() -> None:
    layer = nn.Linear(10, 4)
    assert count_params(layer) == 44
    _zero_half(layer)
    assert count_params(layer) == 44
    assert count_params(layer, nonzero_only=True) == 20 + 4


def test_count_params_with_prune_reparametrisation() -> None:
    model = small_cnn()
    dense = count_params(model)
    assert dense == sum(p.numel() for p in small_cnn().parameters())
    _prune_half(model)
    assert count_params(model) == dense  # weight_orig counted once, masks (buffers) never
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    assert count_params(model, nonzero_only=True) == dense - weights // 2


def test_count_params_counts_shared_parameters_once() -> None:
    layer = nn.Linear(3, 3)
    assert count_params(nn.Sequential(layer, layer)) == 12


# ------------------------------------------------------------------------------------ latency


def test_measure_latency_is_positive_and_restores_threads() -> None:
    torch.set_num_threads(2)
    model = small_cnn().train()
    seconds = measure_latency(model, (1, 8, 8), threads=1, warmup=2, repeats=5)
    assert isinstance(seconds, float) and seconds > 0
    assert torch.get_num_threads() == 2
    assert model.training


class _Sleeper(nn.Module):
    """A model whose forward pass takes at least ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.layer = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.layer(x)


def test_measure_latencies_times_each_model_in_order() -> None:
    slow, fast = _Sleeper(0.02), _Sleeper(0.0)
    before = torch.get_num_threads()
    times = measure_latencies([fast, slow, fast], (4,), batch_size=2, warmup=1, repeats=3)
    assert len(times) == 3 and torch.get_num_threads() == before
    assert times[1] >= 0.02 and times[0] < 0.02 and times[2] < 0.02
    with pytest.raises(ValueError, match="at least one model"):
        measure_latencies([], (4,))
    with pytest.raises(ValueError, match="does not fit"):  # before any timing
        measure_latencies([fast, nn.Linear(3, 2)], (4,), repeats=1)


class _ColdAfterOthers(nn.Module):
    """A model on a made-up clock: a pass costs ``warm`` seconds, ``cold`` when another model
    ran last (as when other models' kernels evicted its own from a shared cache)."""

    clock: ClassVar[list[float]] = [0.0]
    last: ClassVar[list[object]] = [None]

    def __init__(self, warm: float, cold: float) -> None:
        super().__init__()
        self.warm, self.cold = warm, cold
        self.layer = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.warm if self.last[0] is self else self.cold
        self.last[0] = self
        return self.layer(x)


def test_measure_latencies_times_each_model_warm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved models are timed right after an untimed pass of their own: the cost of
    coming after another model (kernels evicted) stays out of their ratio."""
    import autoprune.costs.latency as latency

    monkeypatch.setattr(latency.time, "perf_counter", lambda: _ColdAfterOthers.clock[0])
    dense, pruned = _ColdAfterOthers(1.0, 1.5), _ColdAfterOthers(0.4, 0.9)
    times = measure_latencies([dense, pruned], (4,), warmup=1, repeats=5)
    assert times == pytest.approx([1.0, 0.4])  # the warm ratio 0.4, not the cold 0.6
    cold = latency.round_robin(
        [lambda: dense(torch.zeros(1, 4)), lambda: pruned(torch.zeros(1, 4))], 1, 5
    )
    assert cold == pytest.approx([1.5, 0.9])  # one pass each per round: every pass cold


def test_measure_latency_restores_threads_on_error() -> None:
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        measure_latency(small_cnn(), (8, 8), threads=1, warmup=0, repeats=1)
    assert torch.get_num_threads() == 2


def test_table_predicts_dense_latency(
    res_table: tuple[LatencyTable, Path, float], tmp_path: Path
) -> None:
    table = res_table[0]
    assert table.predict_model(TinyResNet()) == pytest.approx(table.predict({}))
    # Other processes on a shared machine change its speed for seconds at a time, so compare a
    # fresh table with a measurement right after it, and allow three tries.
    pairs = []
    for attempt in range(3):
        fresh = LatencyTable.build(
            TinyResNet(), RES_SHAPE, grid=2, repeats=20, cache_dir=tmp_path / str(attempt)
        )
        pairs.append((fresh.predict({}), measure_latency(TinyResNet(), RES_SHAPE, repeats=50)))
        if pairs[-1][0] == pytest.approx(pairs[-1][1], rel=0.35):
            return
    pytest.fail(f"(predicted, measured) seconds too far apart: {pairs}")


def test_table_knows_layers_and_their_followers(
    res_table: tuple[LatencyTable, Path, float],
) -> None:
    table = res_table[0]
    assert list(table.layers) == ["stem", "conv1", "conv2", "fc"]
    assert table.layers["conv1"].spec.bn and table.layers["conv1"].spec.act == "ReLU"
    # The residual add is no module: ReLU still follows bn2 in the call order (adds: overhead).
    assert table.layers["conv2"].spec.bn and table.layers["conv2"].spec.act == "ReLU"
    assert not table.layers["fc"].spec.bn and table.layers["fc"].spec.act is None
    assert table.layers["conv1"].ins == [8, 16, 24, 32]
    assert table.layers["stem"].ins == [1, 2, 3]


def test_table_predicts_halved_model_faster(res_table: tuple[LatencyTable, Path, float]) -> None:
    table = res_table[0]
    halved = TinyResNet(width=16)
    predicted = table.predict_model(halved)
    assert predicted < table.predict({})
    assert predicted == pytest.approx(
        table.predict(
            {n: (3 if n == "stem" else 16, 10 if n == "fc" else 16) for n in table.layers}
        )
    )


def test_depthwise_layer_has_a_one_dimensional_table(tmp_path: Path) -> None:
    table = LatencyTable.build(small_cnn(), (1, 8, 8), grid=4, repeats=3, cache_dir=tmp_path)
    dw = table.layers["3"]
    assert dw.spec.depthwise and dw.ins == [2, 4, 6, 8] and len(dw.outs) == 1
    assert table.layers["0"].ins == [1]  # one input channel: nothing to interpolate
    # A grid point is looked up exactly; the out-channels of a depthwise layer follow its ins.
    others = table.predict({}) - dw.dense
    assert table.predict({"3": (4, 4)}) == pytest.approx(others + dw.seconds[1][0])
    between = (dw.seconds[1][0] + dw.seconds[2][0]) / 2
    assert table.predict({"3": (5, 5)}) == pytest.approx(others + between)


def test_table_is_cached(res_table: tuple[LatencyTable, Path, float]) -> None:
    table, folder, first = res_table
    start = time.perf_counter()
    again = LatencyTable.build(TinyResNet(), RES_SHAPE, grid=4, repeats=20, cache_dir=folder)
    assert time.perf_counter() - start < 0.5 * first
    assert again.to_dict() == table.to_dict()
    assert [p.name for p in folder.iterdir()] == [f"{table.key}.json"]  # no temp files left
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_different_input_shape_gives_different_cache_file(tmp_path: Path) -> None:
    small = LatencyTable.build(TinyResNet(8), (3, 8, 8), grid=2, repeats=2, cache_dir=tmp_path)
    large = LatencyTable.build(TinyResNet(8), (3, 12, 12), grid=2, repeats=2, cache_dir=tmp_path)
    assert small.key != large.key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{small.key}.json", f"{large.key}.json"]
    )


def test_corrupt_cache_file_is_rebuilt(tmp_path: Path) -> None:
    table = LatencyTable.build(TinyResNet(8), (3, 8, 8), grid=2, repeats=2, cache_dir=tmp_path)
    path = tmp_path / f"{table.key}.json"
    path.write_text("{not json")
    again = LatencyTable.build(TinyResNet(8), (3, 8, 8), grid=2, repeats=2, cache_dir=tmp_path)
    assert again.key == table.key
    assert json.loads(path.read_text())["key"] == table.key


def test_cache_dir_defaults_to_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    table = LatencyTable.build(TinyResNet(8), (3, 8, 8), grid=2, repeats=2)
    assert (tmp_path / "latency" / f"{table.key}.json").exists()


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 8, 8), (2, 8, 8)])
def test_wrong_input_shape_is_a_clear_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        measure_macs(small_cnn(), shape)


def test_wrong_input_shape_in_table_build(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        LatencyTable.build(TinyResNet(), (16, 16), cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threads": 0}, "threads"), ({"grid": 1}, "grid"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_table_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LatencyTable.build(small_cnn(), (1, 8, 8), cache_dir=tmp_path, **kwargs)


def test_bad_latency_arguments() -> None:
    with pytest.raises(ValueError, match="threads"):
        measure_latency(small_cnn(), (1, 8, 8), threads=0)


def test_predict_rejects_unknown_layers(res_table: tuple[LatencyTable, Path, float]) -> None:
    with pytest.raises(ValueError, match="nope"):
        res_table[0].predict({"nope": (1, 1)})
    with pytest.raises(ValueError, match="lacks"):
        res_table[0].predict_model(small_cnn())
