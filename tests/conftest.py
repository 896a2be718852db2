from __future__ import annotations

import pytest
import torch

import hyfx
from hyfx.data import ImageSet, find_sample_dir, load_image_folder

torch.manual_seed(0)


@pytest.fixture(scope="session")
def sample_images() -> ImageSet:
    """The real ImageNet sample (1000 images, one per class); tests needing it skip when it is absent."""
    root = find_sample_dir()
    if root is None:
        pytest.skip("ImageNet sample folder not found (../shared/data/imagenet-sample or $HYFX_SAMPLE_DIR)")
    return load_image_folder(root)


@pytest.fixture
def lite0_real_w6_plan(capsys, tmp_path, sample_images):
    """`hyfx quantize lite0-real --recipe minmax --bits 6` on 4 sample images with extra flags, as a user runs it;
    returns (plan, stdout) and fails the test if the command does."""
    from hyfx import cli

    def run(*flags: str) -> tuple[hyfx.QuantPlan, str]:
        path = tmp_path / "plan.json"
        code = cli.main(["quantize", "lite0-real", "--recipe", "minmax", "--bits", "6", "--calib",
                         str(sample_images.root), "--n-calib", "4", *flags, "--out", str(path)])
        out, err = capsys.readouterr()
        assert code == 0, err
        return hyfx.load_plan(path), out

    return run


class ConvHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def conv_head():
    """(model, analysed graph, calibration batches): a conv + BatchNorm + linear head whose BN has negative scales
    (the fold negates a conv's channels) and whose input has a non-zero mean (rounding shifts the outputs)."""
    torch.manual_seed(0)
    model = ConvHead().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(-2.0, 2.0)
    calib = [torch.randn(4, 3, 8, 8) + 0.5 for _ in range(3)]
    return model, hyfx.analyze(hyfx.capture(model, calib[0][:1])), calib
