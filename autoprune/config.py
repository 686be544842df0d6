"""Typed, validated configuration of a task (what is pruned and how it is judged).

Configs come from YAML files, Python dicts or ``key=value`` overrides; unknown keys are errors
(``extra="forbid"``) and nothing in a config string is ever evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Granularity = Literal["channel", "fine", "nm"]
Device = Literal["cpu", "cuda", "auto"]


ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The network: a zoo name (``resnet20``) or a ``package.module:factory`` string."""

    name: str = "resnet20"
    checkpoint: str | None = Field(
        default=None,
        description="Path to a state dict; None = the cached default checkpoint "
        "(trained on first use) for the task's data.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra factory arguments.")
    classifier: str | None = Field(
        default=None,
        description="The layer whose outputs are the classes (never pruned); None = the last "
        "conv / linear layer with as many outputs as the model.",
    )


class DataConfig(_Strict):
    """The data set and its deterministic train / search / test splits."""

    name: Literal["digits", "fashion_mnist", "mnist", "imagefolder", "cifar10", "npz"] = "digits"
    path: str | None = Field(
        default=None,
        description="Folder (fashion_mnist, mnist, imagefolder, cifar10) or file (npz); "
        "fashion_mnist defaults to Debian's /usr/share/datasets/fashion-mnist.",
    )
    resize: int | tuple[int, int] | None = Field(
        default=None, description="Resize images to NxN, or to [height, width]."
    )
    search_size: int = Field(
        default=500, ge=10, description="Images held out of the training data for the search."
    )
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Test share (digits and npz without a test split)."
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _search_size_default(cls, values: Any) -> Any:
        """AMC's 5,000 held-out images where the training set is large (MNIST-like sets)."""
        if isinstance(values, dict) and "search_size" not in values:
            big = values.get("name") in ("fashion_mnist", "mnist")
            values = {**values, "search_size": 5000 if big else 500}
        return values

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.name in ("cifar10", "npz", "mnist", "imagefolder") and not self.path:
            raise ValueError(f"data.path is required for data.name={self.name!r}")
        sides = self.resize_hw or (4, 4)
        if not all(4 <= s <= 512 for s in sides):
            raise ValueError(f"data.resize sides must be in [4, 512], got {self.resize}")
        return self

    @property
    def resize_hw(self) -> tuple[int, int] | None:
        """``resize`` as (height, width)."""
        if self.resize is None:
            return None
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        return (int(self.resize[0]), int(self.resize[1]))


class TrainConfig(_Strict):
    """How a checkpoint is trained (also used for the default checkpoint)."""

    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.05, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    bn_l1: float = Field(
        default=0.0, ge=0, description="Network-slimming L1 penalty on BN scaling factors."
    )
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Cross-entropy smoothing.")
    augment: bool = Field(default=True, description="Random shifts (zero padding + crop).")
    flip: bool = Field(default=False, description="Random horizontal flips.")
    finetune_augment: bool = Field(
        default=False,
        description="Augment (shift, and flip if set) when fine-tuning a pruned model.",
    )
    channels_last: bool = Field(
        default=False,
        description="Train in channels-last memory layout (faster convolutions on CPU).",
    )
    seed: int = 0


# Training defaults per data set, for the keys a config leaves out: digits keeps TrainConfig's
# own; real data sets train fewer, larger-batch epochs (the default checkpoint must train within
# about 20 minutes on 2 cores) and augment fine-tuning too; natural images are also flipped.
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"epochs": 8, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4,
                      "flip": True, "finetune_augment": True, "channels_last": True},
    "mnist": {"epochs": 8, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4,
              "finetune_augment": True, "channels_last": True},
    "cifar10": {"epochs": 30, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "flip": True,
                "finetune_augment": True, "channels_last": True},
    "imagefolder": {"flip": True, "finetune_augment": True, "channels_last": True},
}  # fmt: skip


# Epochs per zoo model on the 28x28 data sets, where a model's default checkpoint would not train
# within the ~20 minutes at 8 epochs (measured training steps at batch 128, 2 threads: ResNet-20
# 0.33 s, ResNet-56 1.1 s, VGG-11 1.1 s, MobileNetV2 2.5 s; 469 steps an epoch). Models not
# listed keep the data set's epochs.
MODEL_EPOCHS: dict[str, dict[str, int]] = {
    "fashion_mnist": {"resnet32": 5, "resnet56": 2, "vgg11": 2, "vgg16": 1, "mobilenetv2": 1},
    "mnist": {"resnet32": 5, "resnet56": 2, "vgg11": 2, "vgg16": 1, "mobilenetv2": 1},
}


def _name_of(section: Any, default: str) -> str:
    if isinstance(section, dict):
        return str(section.get("name", default))
    return str(getattr(section, "name", default))


def _train_defaults(data: Any, train: Any, model: Any = None) -> Any:
    """``train`` (a mapping) with the data set's (and model's) defaults for the keys it does not
    set."""
    name = _name_of(data, "digits")
    preset = dict(TRAIN_DEFAULTS.get(name, {}))
    epochs = MODEL_EPOCHS.get(name, {}).get(_name_of(model, "resnet20"))
    if epochs is not None:
        preset["epochs"] = epochs
    if not preset or not isinstance(train, dict | type(None)):
        return train
    return {**preset, **(train or {})}


class NMConfig(_Strict):
    """N:M semi-structured sparsity: ``m`` is the group size; a unit's ratio picks N."""

    m: int = Field(default=4, ge=2, le=32)


class EvalConfig(_Strict):
    """How the evaluator judges a policy (AMC + adaptive BN, EagleEye)."""

    bn_batches: int = Field(default=4, ge=0, description="Batches for BN recalibration (0: off).")
    bn_batch_size: int = Field(default=64, ge=1)
    batch_size: int = Field(default=512, ge=1, description="Batch size for accuracy.")
    latency: bool = Field(default=False, description="Measure latency of every pruned model.")
    latency_batch_size: int = Field(
        default=1, ge=1, description="Batch size of latency measurements and the lookup table."
    )
    cache_size: int = Field(default=4096, ge=0)
    search_images: int | None = Field(
        default=None,
        ge=1,
        description="Score policies on this many images of the search split (a fixed, seeded "
        "sample); None = all of it.",
    )
    reject: bool = Field(
        default=True,
        description="Early rejection: a searcher that passes its best accuracy so far gets, "
        "for a policy that provably cannot reach it, a partial estimate from a first slice of "
        "the search split (flagged partial, never the best) instead of a full evaluation.",
    )
    reject_stages: list[float] = Field(
        default_factory=lambda: [0.2, 0.5],
        description="Fractions of the search split after which a policy may be rejected.",
    )
    reject_z: float = Field(
        default=3.0, gt=0, description="Confidence of the rejection bound (Wilson, z)."
    )
    reject_min_images: int = Field(
        default=1000, ge=1, description="No rejection on a search split smaller than this."
    )

    @field_validator("reject_stages")
    @classmethod
    def _stages(cls, stages: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in stages):
            raise ValueError(f"reject_stages must be fractions in (0, 1), got {stages}")
        return sorted(set(stages))


class TaskConfig(_Strict):
    """Everything that defines a task: model, data, granularity, criterion, evaluation."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    granularity: Granularity = "channel"
    criterion: str = Field(
        default="l2",
        description="Importance criterion; default l2 for channel, magnitude for fine / nm.",
    )
    max_ratio: float = Field(default=0.8, gt=0, lt=1)
    round_to: int = Field(default=1, ge=1, description="Keep channel counts a multiple of this.")
    ignore: list[str] = Field(
        default_factory=list,
        description="Layers (or module prefixes) kept out of the search: their output channels "
        "(channel) or weights (fine / nm) are never pruned.",
    )
    ignore_unsupported: bool = Field(
        default=False,
        description="channel: keep the units that channel pruning would refuse (structures it "
        "cannot cut correctly) out of the search, added to ignore and reported, instead of "
        "refusing the task.",
    )
    reconstruct: bool = Field(default=False, description="Least-squares refit of next layers.")
    nm: NMConfig = Field(default_factory=NMConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    device: Device = "cpu"
    threads: int | None = Field(default=None, ge=1, description="torch threads (None: default).")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _data_set_train_defaults(cls, values: Any) -> Any:
        if isinstance(values, dict):
            values = {
                **values,
                "train": _train_defaults(
                    values.get("data", {}), values.get("train"), values.get("model", {})
                ),
            }
            if values["train"] is None:
                del values["train"]
            if values.get("criterion") is None and values.get("granularity") in ("fine", "nm"):
                values["criterion"] = "magnitude"  # the default l2 ranks filters, not weights
        return values

    @field_validator("criterion")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @model_validator(mode="after")
    def _criterion_fits(self) -> TaskConfig:
        from autoprune.engine.criteria import get_criterion  # torch: only once a config is checked

        get_criterion(self.criterion, self.granularity)  # ValueError names the ones that fit
        return self


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "invalid config: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3). Values are parsed as YAML scalars, never evaluated."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); intermediate dicts are created."""
    out: dict[str, Any] = _deepcopy_dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in {p}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def validated(
    cls: type[ModelT],
    source: BaseModel | dict[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
    section: str | None = None,
) -> ModelT:
    """A validated config of type ``cls`` from a config object, a dict, a YAML path (its
    ``section`` mapping when it has one) or nothing (defaults), with ``key=value`` overrides."""
    if isinstance(source, BaseModel):
        data = source.model_dump()
    elif isinstance(source, dict):
        data = source
    elif source is None:
        data = {}
    else:
        data = load_yaml(source)
        if section is not None and isinstance(data.get(section), dict):
            data = data[section]
    data = apply_overrides(data, list(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def task_config(
    source: TaskConfig | dict[str, Any] | str | Path | None = None,
    overrides: list[str] | None = None,
) -> TaskConfig:
    """Build a validated :class:`TaskConfig` from a config, a dict, a YAML path or nothing."""
    return validated(TaskConfig, source, overrides or [], section="task")
