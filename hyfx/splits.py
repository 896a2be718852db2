"""The one place that decides which images calibrate and which evaluate, so the two never overlap and a zoo model is
never evaluated on an image it was trained on."""

from __future__ import annotations

import random
from pathlib import Path

from hyfx import zoo
from hyfx.data import ImageSet, find_sample_dir, load_image_folder, split
from hyfx.errors import HyfxError


def _at_most(images: ImageSet, n: int | None, seed: int) -> ImageSet:
    """`n` of the images drawn with `seed` (the ones `split` leaves after drawing the others), or all of them."""
    if n is None or n >= len(images):
        return images
    return split(images, len(images) - n, seed=seed)[1]


def usable_images(name: str, folder: str | Path) -> ImageSet:
    """The images of `folder` minus those model `name` was trained on (a zoo hybrid's distillation set)."""
    images = load_image_folder(folder)
    trained = zoo.training_images(name)
    if trained:
        images = images.without(trained)
        if len(images) == 0:
            raise HyfxError(f"every image in {folder} was used to train {name}: pass other images")
    return images


def calibration_split(name: str, images: ImageSet, n_calib: int, n_eval: int | None = None, seed: int = 0,
                      from_training: bool = False, calibration_only: bool = False) -> tuple[ImageSet, ImageSet]:
    """Disjoint (calibration, evaluation) images for model `name`; it is never evaluated on images it was trained on.

    Calibration is drawn from the held-out images, or with `from_training` from the images the model was trained
    on (the papers' protocol: calibrate on ImageNet train, evaluate on val), leaving every held-out image to
    evaluation."""
    trained = zoo.training_images(name)
    held_out = images.without(trained)
    if not len(held_out):
        raise HyfxError(f"every image in {images.root} was used to train {name}: pass other images")
    if not from_training:
        return split(held_out, n_calib, n_eval, seed=seed, calibration_only=calibration_only)
    if n_calib < 1:
        raise HyfxError(f"calibration needs at least one image, got n_calib={n_calib}")
    if not trained:
        raise HyfxError(f"calibration from training images: {name} records no training images (only the hybrids "
                        "hyfx distils do): calibrate on held-out images (drop --calib-from-training)")
    training = images.only(trained)
    if len(training) < n_calib:
        raise HyfxError(f"calibration from training images: {images.root} holds {len(training)} of {name}'s "
                        f"training images, fewer than the {n_calib} asked for: ask for fewer")
    calib = training if len(training) == n_calib else split(training, n_calib, seed=seed)[0]
    return calib, _at_most(held_out, n_eval, seed)


def sample_split(name: str, folder: str | Path | None = None, n_calib: int = 32, n_eval: int | None = None,
                 seed: int = 0, from_training: bool = False) -> tuple[ImageSet, ImageSet]:
    """`calibration_split` of an image folder (default: the ImageNet sample, `hyfx.data.find_sample_dir`)."""
    folder = folder or find_sample_dir()
    if folder is None:
        raise HyfxError("no image folder: pass --data DIR (class subfolders, or images + labels.csv)")
    return calibration_split(name, load_image_folder(folder), n_calib, n_eval, seed, from_training)


def evaluation_images(name: str, folder: str | Path, calibration: list[str], n_eval: int | None = None,
                      seed: int = 0) -> ImageSet:
    """The images of `folder` a plan calibrated on `calibration` (file names) may be evaluated on: neither those
    nor the model's training images; `n_eval` of them (drawn with `seed`) when fewer are asked for."""
    return _at_most(usable_images(name, folder).without(calibration), n_eval, seed)


def plan_calibration_images(pool: ImageSet, calibration: list[str], n_calib: int = 32, seed: int = 0) -> ImageSet:
    """The images of `pool` a plan was calibrated on (its recorded file names), or `n_calib` drawn from `pool` when it
    records none or none of them are there."""
    images = pool.only(calibration)
    if len(images) == 0:
        images, _ = split(pool, n_calib, seed=seed)
    return images


def search_split(pool: ImageSet, n_calib: int, n_eval: int, n_val: int, seed: int) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Disjoint (calibration, sensitivity-table, validation) images for a mixed-precision search."""
    calib, rest = split(pool, n_calib, seed=seed)
    if n_eval + n_val > len(rest):
        raise HyfxError(f"{n_calib} calibration + {n_eval} table + {n_val} validation images need more than the "
                        f"{len(pool)} available: lower --n-eval / --n-val")
    order = list(range(len(rest)))
    random.Random(seed + 1).shuffle(order)
    return calib, rest.subset(sorted(order[:n_eval])), rest.subset(sorted(order[n_eval:n_eval + n_val]))
