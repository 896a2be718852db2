"""Image folders → calibration / evaluation loaders, with timm's data config and eval transform."""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from torch.utils.data import DataLoader, Dataset

from hyfx.errors import HyfxError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
LABELS_CSV = "labels.csv"


@dataclass(frozen=True)
class ImageSet:
    """A list of labelled image files; the label is an ImageNet class index (or -1 when unknown)."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int]) -> ImageSet:
        return ImageSet(self.root, tuple(self.files[i] for i in indices), tuple(self.labels[i] for i in indices))

    def names(self) -> list[str]:
        return [str(f.relative_to(self.root)) for f in self.files]

    def without(self, names: Sequence[str]) -> ImageSet:
        """Drop the images whose relative names are listed (e.g. images a model was trained on)."""
        drop = set(names)
        keep = [i for i, n in enumerate(self.names()) if n not in drop]
        return self.subset(keep)

    def only(self, names: Sequence[str]) -> ImageSet:
        """Keep only the images whose relative names are listed (e.g. a model's training images)."""
        wanted = set(names)
        return self.subset([i for i, n in enumerate(self.names()) if n in wanted])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _read_labels_csv(root: Path, labels_csv: Path) -> tuple[list[Path], list[int]]:
    """(files, class indices) of a labels CSV, every row checked: an integer class index ≥ 0 and a file that exists.

    Images in the folder that the CSV does not list are reported (a warning), not used."""
    files, labels = [], []
    try:
        with labels_csv.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file" not in reader.fieldnames or "class_index" not in reader.fieldnames:
                raise HyfxError(f"{labels_csv} must have columns 'file' and 'class_index'")
            for line, row in enumerate(reader, start=2):
                name, index = (row.get("file") or "").strip(), (row.get("class_index") or "").strip()
                try:
                    label = int(index)
                except ValueError:
                    raise HyfxError(f"{labels_csv} line {line}: class_index {index!r} of {name!r} is not an integer: "
                                    "write the ImageNet class index (0-999)") from None
                if label < 0:
                    raise HyfxError(f"{labels_csv} line {line}: class_index {label} of {name!r} is negative: "
                                    "write the ImageNet class index (0-999)")
                path = root / name
                if not name or not path.is_file():
                    raise HyfxError(f"{labels_csv} line {line}: file {name!r} is not in {root}: "
                                    "remove the row or add the image")
                if _is_image(path):
                    files.append(path)
                    labels.append(label)
    except UnicodeDecodeError:
        raise HyfxError(f"{labels_csv} is not a text CSV: write it with columns 'file' and 'class_index'") from None
    listed = set(files)
    unlisted = [p.name for p in sorted(root.iterdir()) if _is_image(p) and p not in listed]
    if unlisted:
        log.warning("%d images in %s are not in %s and are left out (e.g. %s)", len(unlisted), root, LABELS_CSV,
                    ", ".join(unlisted[:3]))
    return files, labels


def load_image_folder(root: str | Path) -> ImageSet:
    """Read either a flat folder with a labels CSV (columns `file`, `class_index`) or class subfolders.

    Class subfolders are indexed in sorted order, as torchvision's ImageFolder (and timm) do.
    """
    root = Path(root)
    if not root.is_dir():
        raise HyfxError(f"image folder {root} does not exist: pass a folder of images (class subfolders or a {LABELS_CSV})")
    labels_csv = root / LABELS_CSV
    if labels_csv.is_file():
        files, labels = _read_labels_csv(root, labels_csv)
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        files, labels = [], []
        for idx, cls in enumerate(classes):
            for path in sorted((root / cls).iterdir()):
                if _is_image(path):
                    files.append(path)
                    labels.append(idx)
        if not classes:  # a flat folder of unlabelled images still serves for calibration
            files = [p for p in sorted(root.iterdir()) if _is_image(p)]
            labels = [-1] * len(files)
    if not files:
        raise HyfxError(
            f"image folder {root} holds no images: expected *.jpg/*.png files with a {LABELS_CSV}, or class subfolders"
        )
    return ImageSet(root, tuple(files), tuple(labels))


def _unreadable(path: Path, exc: Exception) -> HyfxError:
    return HyfxError(f"cannot read image {path} ({exc.__class__.__name__}): remove or replace the file")


def verify_images(images: ImageSet) -> ImageSet:
    """Fail early, naming the file, when an image cannot be decoded (even if a recipe never reads it)."""
    for path in images.files:
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise _unreadable(path, exc) from None
    return images


def split(images: ImageSet, n_calib: int, n_eval: int | None = None, seed: int = 0,
          calibration_only: bool = False) -> tuple[ImageSet, ImageSet]:
    """Disjoint calibration and evaluation subsets drawn by a seeded permutation. `calibration_only`: nothing is
    evaluated on these images (a separate folder is), so every one of them may calibrate."""
    if n_calib < 1:
        raise HyfxError(f"calibration needs at least one image, got n_calib={n_calib}")
    if n_calib > len(images):
        raise HyfxError(f"{n_calib} calibration images asked for, {images.root} has {len(images)} usable: "
                        "lower --n-calib")
    if n_calib == len(images) and calibration_only:
        return images, images.subset([])
    if n_calib >= len(images):
        raise HyfxError(f"n_calib={n_calib} leaves no evaluation images out of {len(images)}: use fewer calibration images")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    calib = order[:n_calib]
    rest = order[n_calib:]
    evaluation = rest if n_eval is None else rest[:n_eval]
    return images.subset(sorted(calib)), images.subset(sorted(evaluation))


class _ImageDataset(Dataset):
    def __init__(self, images: ImageSet, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.images.files[i]
        try:
            with Image.open(path) as img:
                tensor = self.transform(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise _unreadable(path, exc) from None
        return tensor, self.images.labels[i]


def data_config(model: torch.nn.Module) -> dict:
    """timm's resolved data config (input size, interpolation, crop, mean/std) for a model."""
    return resolve_model_data_config(model)


def make_loader(
    images: ImageSet, config: dict, batch_size: int = 32, transform=None, num_workers: int = 0
) -> DataLoader:
    """A loader over `images` using timm's eval transform for `config` unless a transform is given."""
    transform = transform or create_transform(**config, is_training=False)
    return DataLoader(_ImageDataset(images, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def example_input(config: dict, batch_size: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, *config["input_size"])


SAMPLE_ENV = "HYFX_SAMPLE_DIR"


def find_sample_dir() -> Path | None:
    """The ImageNet sample folder: $HYFX_SAMPLE_DIR, else `shared/data/imagenet-sample` beside the checkout."""
    env = os.environ.get(SAMPLE_ENV)
    if env and Path(env).is_dir():
        return Path(env)
    local = Path(__file__).resolve().parents[2] / "shared/data/imagenet-sample"
    return local if local.is_dir() else None
