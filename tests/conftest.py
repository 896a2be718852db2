from __future__ import annotations

import pytest
import torch

from hyfx.data import ImageSet, find_sample_dir, load_image_folder

torch.manual_seed(0)


@pytest.fixture(scope="session")
def sample_images() -> ImageSet:
    """The real ImageNet sample (1000 images, one per class); tests needing it skip when it is absent."""
    root = find_sample_dir()
    if root is None:
        pytest.skip("ImageNet sample folder not found (../shared/data/imagenet-sample or $HYFX_SAMPLE_DIR)")
    return load_image_folder(root)
