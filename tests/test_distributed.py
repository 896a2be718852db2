"""The sensitivity table on a local Ray: the serial table bit for bit, and a clear error without Ray."""

from __future__ import annotations

import pytest
import torch
from timm.models.byobnet import LayerFn
from timm.models.mobilevit import MobileVitBlock
from torch import nn

from hyfx import cli, ray_workers
from hyfx.errors import HyfxError
from hyfx.graph import GraphRecipe, HybridGraph
from hyfx.hardware import BitConfig, this_cpu
from hyfx.mixed.distributed import plan_tasks, split_layers
from hyfx.mixed.sensitivity import build_table

ray = pytest.importorskip("ray", reason="the distributed extra (pip install -e '.[distributed]') is not installed")


def tiny_model() -> nn.Module:
    """Only library classes, so Ray workers unpickle it without this test module on their path."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         MobileVitBlock(8, 8, transformer_dim=16, transformer_depth=1, patch_size=2, num_heads=2,
                                        layers=LayerFn()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_split_layers_covers_every_layer_once():
    groups = split_layers([f"l{i}" for i in range(10)], 4)
    assert sorted(sum(groups, [])) == [f"l{i}" for i in range(10)] and len(groups) == 4
    assert split_layers(["a"], 8) == [["a"]]


@pytest.mark.parametrize("n_images, workers, n_tasks", [(32, 2, 4), (48, 2, 6), (16, 2, 4), (16, 1, 2), (160, 2, 10),
                                                        (50_000, 8, 3125)])
def test_tasks_split_images_by_chunk_and_layers_only_to_even_out_the_workers(n_images, workers, n_tasks):
    layers = [f"l{i}" for i in range(10)]
    tasks = plan_tasks(n_images, 16, layers, workers)
    assert len(tasks) == n_tasks
    pairs = [(images, layer) for images, group in tasks for layer in group]
    assert len(pairs) == len(set(pairs)) == len(layers) * -(-n_images // 16)  # every (chunk, layer) once
    assert all(stop - start == 16 for (start, stop), _ in tasks[:-1]) and tasks[-1][0][1] == n_images
    if n_images < 4 * 16 * workers:  # few chunks: 2+ tasks per worker, equal counts, as few layer splits as that needs
        assert len(tasks) % workers == 0 and len(tasks) >= 2 * workers and len({len(g) for _, g in tasks}) <= 2


def tiny_setup(seed: int, n_eval: int) -> tuple[GraphRecipe, HybridGraph, list, list]:
    """The tiny model's rebuild recipe and graph, two calibration batches and one labelled evaluation batch."""
    recipe = GraphRecipe(tiny_model(), (1, 3, 16, 16))
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(2)]
    evaluation = [(torch.randn(n_eval, 3, 16, 16, generator=gen), torch.randint(0, 10, (n_eval,), generator=gen))]
    return recipe, recipe(), calib, evaluation


def test_distributed_table_is_the_serial_table_bit_for_bit():
    recipe, hg, calib, evaluation = tiny_setup(seed=0, n_eval=6)
    configs = [BitConfig(4, 8), BitConfig(8, 8)]
    profile = this_cpu()  # the roofline reads the thread count: one profile for both tables
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each: the serial reference does too
    try:
        serial = {chunk: build_table(hg, calib, evaluation, configs, profile=profile, chunk=chunk, progress=False)[0]
                  for chunk in (4, 16)}
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for chunk, tasks in ((4, 4), (16, 4)):
            # 14 images in chunks of 4: four whole-chunk tasks, two per worker, no FP32 pass repeated; in one chunk
            # of 16: its layers in four groups, two per worker
            spread, _ = build_table(hg, calib, evaluation, configs, profile=profile, chunk=chunk, workers=2,
                                    rebuild=recipe, progress=False)
            stats = ray_workers.LAST_RUN
            assert spread.to_dict() == serial[chunk].to_dict()  # KL, top-1, top-5 of every entry, the pruning
            assert stats["workers"] == 2 and stats["tasks"] == tasks and len(stats["setup_seconds"]) == 2
    finally:
        ray.shutdown()
    assert serial[4].has_accuracy() and len(serial[4].entries) == 2 * len(hg.layers())


def test_accuracy_tables_on_ray_are_the_serial_tables():
    """`hyfx bench --workers`: every row's plan and predictions made on Ray workers, the same figures as serially."""
    from hyfx.pipelines.bench import Variant, accuracy_tables

    recipe, hg, calib, evaluation = tiny_setup(seed=1, n_eval=8)
    rows = [Variant("minmax", "minmax"), Variant("ptq4vit", "ptq4vit"), Variant("minmax (full)", "minmax", {"full": True},
                                                                               "full")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = accuracy_tables(hg, calib, evaluation, bits=(8, 4), rows=rows)
        spread = accuracy_tables(hg, calib, evaluation, bits=(8, 4), rows=rows, workers=2, rebuild=recipe)
    finally:
        torch.set_num_threads(threads)

    def figures(tables: dict) -> dict:
        return {b: {label: {k: v for k, v in row.items() if k not in ("plan_seconds", "plan_vs_fp32_pass")}
                    for label, row in rows_.items()} for b, rows_ in tables["bits"].items()}

    assert figures(spread) == figures(serial) and set(serial["bits"]) == {"8", "4"}
    assert ray_workers.LAST_RUN["tasks"] == 6 and ray_workers.LAST_RUN["workers"] == 2
    assert serial["bits"]["4"]["minmax"]["kl"] > serial["bits"]["8"]["minmax"]["kl"] > 0  # real quantized runs


def test_bench_cli_refuses_bad_worker_counts(capsys):
    assert cli.main(["bench", "lite0-real", "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err


def test_without_ray_workers_is_a_one_line_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(HyfxError, match=r"pip install -e \"\.\[distributed\]\""):
        ray_workers.require_ray()


def test_search_cli_refuses_bad_worker_counts(capsys, sample_images):
    assert cli.main(["search", "mobilevit_xxs", "--calib", str(sample_images.root), "--budget", "bytes=0.5x",
                          "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
