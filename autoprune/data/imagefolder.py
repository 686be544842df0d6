"""Image folders: one sub-folder per class of PNG / JPEG files, decoded with Pillow.

``data.path`` holds either ``train/`` and ``test/`` (each with the same class sub-folders; the
test folder is the test split) or the class sub-folders themselves (then ``data.test_fraction``
carves a stratified test split). Class names are sorted to give label numbers. Images are grey
(1 channel) when every file is single-channel, else RGB (3 channels); images of different
sizes need ``data.resize`` (one side, or ``[height, width]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoprune.config import DataConfig
from autoprune.data.core import Arrays, DataError, register

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _classes(folder: Path) -> list[str]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder} has no class sub-folders")
    return classes


def _files(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (folder / name).rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
        )
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"image folder {folder} holds no {'/'.join(EXTENSIONS)} files")
    return files, np.asarray(labels, dtype=np.int64)


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            img = opened.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _mode(files: list[Path]) -> str:
    from PIL import Image, UnidentifiedImageError

    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode not in ("1", "L", "I", "I;16", "F", "LA"):
                    return "RGB"
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
    return "L"


def _stack(files: list[Path], mode: str, size: tuple[int, int] | None, root: Path) -> np.ndarray:
    images = [_decode(p, mode, size) for p in files]
    shapes = sorted({a.shape[1:] for a in images})
    if len(shapes) > 1:
        raise DataError(
            f"images in {root} have different sizes {shapes[:4]}: set data.resize "
            "(one side or [height, width])"
        )
    return np.stack(images)


def load_imagefolder(cfg: DataConfig) -> Arrays:
    if cfg.path is None:
        raise DataError("data.path is required for data.name='imagefolder'")
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    size = cfg.resize_hw
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split else root
    classes = _classes(train_root)
    files, labels = _files(train_root, classes)
    test_files: list[Path] = []
    if split:
        test_classes = _classes(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(f"{root / 'test'} has classes {unknown} that train/ does not have")
        test_files, test_labels = _files(root / "test", classes)
    mode = _mode(files + test_files)
    x_train = _stack(files, mode, size, train_root)
    if not split:
        return Arrays(x_train, labels)
    x_test = _stack(test_files, mode, size or tuple(x_train.shape[2:]), root / "test")  # type: ignore[arg-type]
    return Arrays(x_train, labels, x_test, test_labels)


register("imagefolder", load_imagefolder)
