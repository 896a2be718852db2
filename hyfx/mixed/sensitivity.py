"""HySquant's sensitivity table: every quantizable layer × every bit config, quantized alone.

Each entry records the search's proxy (mean KL(FP32 ‖ quantized) on the calibration images), top-1 and
top-5 on a labelled evaluation subset, and the hardware figures (latency, the paper's energy, weight bytes).

Quantizing one layer changes only what lies downstream of it, so the float activations of a chunk of
images are computed once and each entry re-runs only the layer's descendants from them (`_Suffix`); the
layer itself is quantized with the same quantize/dequantize ops the rewrite pass inserts, so an entry equals
`hyfx.quantize(gm, single-layer plan)` on the same images (checked in tests).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from tqdm import tqdm

from hyfx.errors import HyfxError
from hyfx.evaluate import kl_divergence, topk_correct
from hyfx.files import atomic_path, save_figure, write_text
from hyfx.graph import HybridGraph, analysed
from hyfx.hardware import DEFAULT_CONFIGS, BitConfig, DeviceProfile, GraphWork, LatencyModel, graph_work
from hyfx.ops import MATMUL, descendants, mutated_args, weight_arg
from hyfx.passes.insert_quant import getattr_path
from hyfx.quant.calibrate import calibrate_activations
from hyfx.quant.quantizers import calibrate_weight, qd
from hyfx.quant.spec import LayerPolicy, QuantPlan, QuantSpec

# images per FP32 pass whose activations each layer's suffix reruns from: 8 keeps a lite0-sized model's activations
# closer to cache than 16, faster alone and with two workers slowing each other less (README, "on Ray")
CHUNK = 8
COLLAPSE_DROP = 10.0  # top-1 points lost by one layer alone at low activation bits that count as a collapse


# ---------------------------------------------------------------------------------------------- policies


class Policies:
    """The LayerPolicy of every (layer, config): symmetric per-channel weights, calibrated asymmetric inputs.

    Activation ranges are calibrated once per activation bit-width with the same specs and observer as the minmax
    (or percentile) recipe, so a searched plan quantizes each layer exactly as that recipe would at the chosen bits.
    """

    def __init__(self, hg: HybridGraph, calib_loader: Iterable, configs: Sequence[BitConfig], layers: Sequence[str],
                 observer: str = "minmax", progress: bool = True):
        self.hg = hg
        self.layers = list(layers)
        self.inputs: dict[int, dict[str, dict[int, QuantSpec]]] = {}
        for a_bits in sorted({c.a_bits for c in configs}):
            act = QuantSpec(bits=a_bits, granularity="tensor", scheme="asymmetric")
            plan = QuantPlan(recipe="hysquant")
            for layer in self.layers:
                plan.set(layer, LayerPolicy(inputs={0: act, 1: act} if hg.tags(layer)["kind"] == MATMUL else {0: act}))
            plan = calibrate_activations(hg.gm, plan, calib_loader, observer=observer, progress=progress)
            self.inputs[a_bits] = {layer: dict(plan.layers[layer].inputs) for layer in self.layers}
        self.observer = observer

    def policy(self, layer: str, config: BitConfig) -> LayerPolicy:
        inputs = self.inputs[config.a_bits][layer]
        if self.hg.tags(layer)["kind"] == MATMUL:
            return LayerPolicy(inputs=dict(inputs))
        return LayerPolicy(weight=QuantSpec(bits=config.w_bits, granularity="channel", scheme="symmetric"),
                           inputs=dict(inputs))

    def plan(self, assignment: dict[str, BitConfig], model: str = "") -> QuantPlan:
        plan = QuantPlan(recipe="hysquant", model=model,
                         meta={"bits": {layer: c.name for layer, c in sorted(assignment.items())},
                               "calibration": {"observer": self.observer}})
        for layer, config in assignment.items():
            plan.set(layer, self.policy(layer, config))
        return plan


# ---------------------------------------------------------------------------------------------- suffix runs


def _qdq(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The quantize → dequantize pair insert_quant puts in the graph, applied eagerly."""
    dtype = torch.int8 if spec.signed else torch.uint8
    if spec.granularity == "channel":
        scale = torch.tensor(spec.scale, dtype=torch.float32)
        zero_point = torch.tensor(spec.zero_point, dtype=torch.int64)
        q = qd.quantize_per_channel.default(x, scale, zero_point, spec.axis, spec.qmin, spec.qmax, dtype)
        return qd.dequantize_per_channel.default(q, scale, zero_point, spec.axis, spec.qmin, spec.qmax, dtype)
    args = (spec.scale[0], spec.zero_point[0], spec.qmin, spec.qmax, dtype)
    return qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(x, *args), *args)


class _Suffix:
    """Re-run only what lies downstream of one layer, from a cached float environment."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        self.gm = gm
        self.node = node
        self.downstream = downstream = descendants(node)
        # cached values an in-place op downstream would overwrite must be copied first
        self.copy_first = {a for n in downstream for a in mutated_args(n) if a not in downstream and a is not node}

    def run(self, env: dict[fx.Node, object], layer_out: torch.Tensor) -> torch.Tensor:
        initial = {n: v for n, v in env.items() if n not in self.downstream}
        for n in self.copy_first:
            initial[n] = initial[n].clone()
        initial[self.node] = layer_out
        return fx.Interpreter(self.gm).run(None, initial_env=initial, enable_io_processing=False)


class _KeepAll(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def _as_logits(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Entry:
    layer: str
    config: str
    kl: float  # mean KL(FP32 ‖ this layer quantized alone) on the calibration images, nats
    top1: float | None  # on the evaluation subset, percent
    top5: float | None
    latency: float  # seconds per image, from the table's latency source
    energy: float  # the paper's E = p_f × latency
    weight_bytes: float


@dataclass
class SensitivityTable:
    model: str
    layers: list[str]
    configs: list[BitConfig]
    entries: dict[tuple[str, str], Entry]
    kinds: dict[str, str]  # layer → "conv" | "linear" | "matmul" (+ "/transformer" inside a transformer block)
    fp32: dict  # top1, top5 (evaluation subset), n_eval, n_calib
    fixed: dict  # latency, energy, bytes of what no config changes
    latency_source: str
    device: dict
    pruned: dict[str, str] = field(default_factory=dict)  # "layer/config" → why it left the search space
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ views

    def entry(self, layer: str, config: BitConfig | str) -> Entry:
        return self.entries[(layer, str(config))]

    def allowed(self, layer: str, config: BitConfig | str) -> bool:
        return f"{layer}/{config}" not in self.pruned

    @property
    def reference(self) -> BitConfig:
        """The widest config: every budget given as a ratio ('0.8x') is relative to all layers at it."""
        return max(self.configs, key=lambda c: (c.w_bits + c.a_bits, c.w_bits))

    def matrix(self, column: str) -> np.ndarray:
        """Layers × configs array of one column (kl, top1, top5, latency, energy, weight_bytes)."""
        return np.array([[_num(getattr(self.entry(layer, c), column)) for c in self.configs] for layer in self.layers])

    def mask(self) -> np.ndarray:
        return np.array([[self.allowed(layer, c) for c in self.configs] for layer in self.layers])

    def totals(self, assignment: dict[str, BitConfig]) -> dict[str, float]:
        """Additive predictions for a full assignment: summed KL, latency, energy, bytes (with fixed parts)."""
        rows = [self.entry(layer, assignment[layer]) for layer in self.layers]
        return {
            "kl": sum(e.kl for e in rows),
            "latency": self.fixed["latency"] + sum(e.latency for e in rows),
            "energy": self.fixed["energy"] + sum(e.energy for e in rows),
            "bytes": self.fixed["bytes"] + sum(e.weight_bytes for e in rows),
        }

    def has_accuracy(self) -> bool:
        return self.fp32.get("top1") is not None

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {
            "model": self.model, "layers": self.layers, "configs": [c.name for c in self.configs],
            "kinds": self.kinds, "fp32": self.fp32, "fixed": self.fixed, "latency_source": self.latency_source,
            "device": self.device, "pruned": self.pruned, "meta": self.meta,
            "entries": [asdict(e) for e in self.entries.values()],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityTable:
        entries = {(e["layer"], e["config"]): Entry(**e) for e in data["entries"]}
        return cls(data["model"], data["layers"], [BitConfig.parse(c) for c in data["configs"]], entries,
                   data["kinds"], data["fp32"], data["fixed"], data["latency_source"], data["device"],
                   data.get("pruned", {}), data.get("meta", {}))

    def save(self, stem: str | Path) -> dict[str, Path]:
        """Write <stem>.json (everything), <stem>.csv (one row per entry) and <stem>.png (heat map)."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths = {"json": stem.with_suffix(".json"), "csv": stem.with_suffix(".csv"), "png": stem.with_suffix(".png")}
        write_text(paths["json"], json.dumps(self.to_dict(), indent=1) + "\n")
        with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["layer", "kind", "config", "w_bits", "a_bits", "kl", "top1", "top5", "top1_drop",
                             "latency_s", "energy", "weight_bytes", "latency_source", "allowed"])
            for layer in self.layers:
                for c in self.configs:
                    e = self.entry(layer, c)
                    drop = None if e.top1 is None or self.fp32.get("top1") is None else self.fp32["top1"] - e.top1
                    writer.writerow([layer, self.kinds[layer], c.name, c.w_bits, c.a_bits, f"{e.kl:.6g}",
                                     _fmt(e.top1), _fmt(e.top5), _fmt(drop), f"{e.latency:.6g}", f"{e.energy:.6g}",
                                     f"{e.weight_bytes:.0f}", self.latency_source, self.allowed(layer, c)])
        heatmap(self, paths["png"])
        return paths

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        path = Path(path)
        if not path.is_file():
            raise HyfxError(f"sensitivity table {path} does not exist: build one with `hyfx search` (--table)")
        return cls.from_dict(json.loads(path.read_text()))


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def heatmap(table: SensitivityTable, path: str | Path) -> Path:
    """Layers × configs: colour = log10 KL, text = top-1 drop (points); pruned cells hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = np.log10(np.maximum(table.matrix("kl"), 1e-7))
    drop = table.fp32["top1"] - table.matrix("top1") if table.has_accuracy() else None
    height = max(4.0, 0.22 * len(table.layers) + 1.5)
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(table.configs), height))
    im = ax.imshow(kl, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(table.configs)), [c.name for c in table.configs])
    ax.set_yticks(range(len(table.layers)), [f"{layer} ({table.kinds[layer]})" for layer in table.layers], fontsize=6)
    for i, layer in enumerate(table.layers):
        for j, c in enumerate(table.configs):
            if drop is not None and not math.isnan(drop[i, j]):
                ax.text(j, i, f"{drop[i, j]:+.1f}", ha="center", va="center", fontsize=5,
                        color="white" if kl[i, j] > np.nanmedian(kl) else "black")
            if not table.allowed(layer, c):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xxx", edgecolor="cyan", lw=0))
    fig.colorbar(im, ax=ax, label="log10 KL(FP32 ‖ layer quantized alone)")
    title = f"{table.model}: per-layer sensitivity" + (" (text: top-1 drop, points)" if drop is not None else "")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path, dpi=130)
    return Path(path)


# ---------------------------------------------------------------------------------------------- building it


def _stack(loader: Iterable | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if loader is None:
        return None, None
    images, labels = [], []
    for batch in loader:
        if isinstance(batch, (tuple, list)):
            images.append(batch[0])
            labels.append(torch.as_tensor(batch[1]))
        else:
            images.append(batch)
    x = torch.cat(images) if images else None
    return x, (torch.cat(labels) if labels else None)


def layer_kinds(hg: HybridGraph, layers: Sequence[str]) -> dict[str, str]:
    out = {}
    for layer in layers:
        tags = hg.tags(layer)
        out[layer] = tags["kind"] + ("/transformer" if tags.get("block_kind") == "transformer" else "")
    return out


def layer_logits(hg: HybridGraph, layers: Sequence[str], configs: Sequence[BitConfig],
                 policy_of: dict[tuple[str, str], LayerPolicy], x_all: torch.Tensor, chunk: int = CHUNK,
                 progress: bool = True) -> tuple[torch.Tensor, dict[tuple[str, str], torch.Tensor]]:
    """(FP32 logits, logits with each (layer, config) quantized alone) on `x_all`, `chunk` images at a time:
    the suffix of the graph after each layer is rerun from the FP32 activations."""
    gm_f = hg.gm
    suffixes = {layer: _Suffix(gm_f, hg.node(layer)) for layer in layers}
    weights = {layer: getattr_path(gm_f, w.target) for layer in layers if (w := weight_arg(hg.node(layer))) is not None}
    qweights: dict[tuple[str, int], torch.Tensor] = {}
    logits: dict[tuple[str, str], list] = {(layer, c.name): [] for layer in layers for c in configs}
    fp32_logits = []
    steps = math.ceil(len(x_all) / chunk) * len(layers)
    bar = tqdm(total=steps, desc="sensitivity", disable=not progress, leave=False)
    with torch.no_grad():
        for start in range(0, len(x_all), chunk):
            xs = x_all[start:start + chunk]
            keep = _KeepAll(gm_f)
            fp32_logits.append(_as_logits(keep.run(xs)))
            env = keep.env
            for layer in layers:
                node = hg.node(layer)
                for c in configs:
                    policy = policy_of[(layer, c.name)]
                    args = list(node.args)
                    for idx, spec in policy.inputs.items():
                        args[idx] = _qdq(env[node.args[idx]], spec)
                    for idx, arg in enumerate(args):
                        if isinstance(arg, fx.Node):
                            args[idx] = env[arg]
                    if policy.weight is not None:
                        key = (layer, c.w_bits)
                        if key not in qweights:
                            spec = calibrate_weight(weights[layer], policy.weight)
                            qweights[key] = _qdq(weights[layer], spec)
                        args[1] = qweights[key]
                    kwargs = {k: env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
                    out = node.target(*args, **kwargs)
                    logits[(layer, c.name)].append(_as_logits(suffixes[layer].run(env, out)))
                bar.update(1)
            del env, keep
    bar.close()
    return torch.cat(fp32_logits), {key: torch.cat(values) for key, values in logits.items()}


def build_table(gm: fx.GraphModule | HybridGraph, calib_loader: Iterable, eval_loader: Iterable | None = None,
                configs: Sequence[BitConfig] = DEFAULT_CONFIGS, latency: LatencyModel | None = None,
                profile: DeviceProfile | None = None, layers: Sequence[str] | None = None, model: str = "",
                observer: str = "minmax", chunk: int = CHUNK, collapse_drop: float = COLLAPSE_DROP,
                policies: Policies | None = None, work: GraphWork | None = None, workers: int = 1,
                ray_address: str | None = None, rebuild: Callable[[], HybridGraph] | None = None, threads: int = 1,
                progress: bool = True) -> tuple[SensitivityTable, Policies]:
    """Quantize each layer alone at each config and record the proxy, accuracy and hardware figures.

    `eval_loader` (labelled, disjoint from the calibration images) gives top-1/top-5 per entry and drives
    the pruning rule: a layer whose top-1 collapses (drops by `collapse_drop` points or more) at a low
    activation width even with the widest weights is fixed to wider activations. Without it the table
    holds KL only. Latency defaults to the roofline of `profile` (this CPU when none is given).
    `workers` > 1 or a `ray_address` spreads the layers over Ray workers (hyfx.mixed.distributed), each rebuilding
    the analysed graph with `rebuild` (a picklable callable; fx graphs do not pickle) and running `threads` torch
    threads; the table is the one a serial run with as many threads gives, bit for bit.
    """
    from hyfx.hardware import RooflineLatency, this_cpu

    hg = analysed(gm)
    configs = sorted(dict.fromkeys(configs), key=lambda c: (c.w_bits, c.a_bits))
    if not configs:
        raise HyfxError("the sensitivity table needs at least one bit config, e.g. W8A8")
    layers = list(layers) if layers is not None else hg.layers()
    if not layers:
        raise HyfxError("the model has no conv, linear or matmul layer to quantize")
    profile = profile or this_cpu()
    work = work or graph_work(hg.gm, layers)
    latency = latency or RooflineLatency(work, profile)
    policies = policies or Policies(hg, calib_loader, configs, layers, observer, progress)

    x_calib, _ = _stack(calib_loader)
    x_eval, y_eval = _stack(eval_loader)
    if x_calib is None:
        raise HyfxError("the calibration loader gave no images")
    x_all = x_calib if x_eval is None else torch.cat([x_calib, x_eval])
    n_calib = len(x_calib)

    policy_of = {(layer, c.name): policies.policy(layer, c) for layer in layers for c in configs}
    if workers > 1 or ray_address is not None:
        from hyfx.mixed.distributed import distributed_layer_logits

        fp32, logits = distributed_layer_logits(layer_logits, rebuild, layers, configs, policy_of, x_all, chunk, workers,
                                                ray_address, threads, progress)
    else:
        fp32, logits = layer_logits(hg, layers, configs, policy_of, x_all, chunk, progress)
    fp32_summary: dict = {"n_calib": n_calib, "n_eval": 0 if x_eval is None else len(x_eval), "top1": None, "top5": None}
    if y_eval is not None:
        fp32_summary.update(_topk(fp32[n_calib:], y_eval))
    entries = {}
    for layer in layers:
        for c in configs:
            out = logits.pop((layer, c.name))
            acc = _topk(out[n_calib:], y_eval) if y_eval is not None else {"top1": None, "top5": None}
            lat = latency.layer_latency(layer, c)
            entries[(layer, c.name)] = Entry(layer, c.name, kl_divergence(fp32[:n_calib], out[:n_calib]),
                                             acc["top1"], acc["top5"], lat, profile.energy(lat),
                                             work.layers[layer].weight_bytes(c.w_bits))
    fixed_latency = latency.fixed_latency()
    table = SensitivityTable(
        model=model, layers=layers, configs=configs, entries=entries, kinds=layer_kinds(hg, layers), fp32=fp32_summary,
        fixed={"latency": fixed_latency, "energy": profile.energy(fixed_latency), "bytes": work.fixed_bytes},
        latency_source=latency.source, device=profile.to_dict(),
        meta={"observer": observer, "energy_model": "E = p_f × latency, p_f = max power / peak FLOPS (paper)"},
    )
    table.pruned = collapse_pruning(table, collapse_drop)
    return table, policies


def reprice(table: SensitivityTable, latency: LatencyModel, profile: DeviceProfile) -> SensitivityTable:
    """The same table with latency and energy from another latency model / device (accuracy columns kept)."""
    entries = {}
    for key, e in table.entries.items():
        lat = latency.layer_latency(e.layer, BitConfig.parse(e.config))
        entries[key] = replace(e, latency=lat, energy=profile.energy(lat))
    fixed_latency = latency.fixed_latency()
    fixed = {**table.fixed, "latency": fixed_latency, "energy": profile.energy(fixed_latency)}
    return replace(table, entries=entries, fixed=fixed, latency_source=latency.source, device=profile.to_dict())


def _topk(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    labelled = labels >= 0
    n = int(labelled.sum())
    if n == 0:
        return {"top1": None, "top5": None}
    lg, lb = logits[labelled], labels[labelled]
    return {"top1": 100 * float(topk_correct(lg, lb, 1).float().mean()),
            "top5": 100 * float(topk_correct(lg, lb, 5).float().mean())}


def collapse_pruning(table: SensitivityTable, collapse_drop: float = COLLAPSE_DROP) -> dict[str, str]:
    """The paper's pruning: a layer whose top-1 collapses at a low activation width is fixed to wider ones.

    Collapse is judged on the config with the widest weights at that activation width (so the activation
    is to blame); every config of the layer at that width or below leaves the search space.
    """
    if not table.has_accuracy():
        return {}
    a_max = max(c.a_bits for c in table.configs)
    pruned: dict[str, str] = {}
    for layer in table.layers:
        for a_bits in sorted({c.a_bits for c in table.configs if c.a_bits < a_max}, reverse=True):
            probe = max((c for c in table.configs if c.a_bits == a_bits), key=lambda c: c.w_bits)
            drop = table.fp32["top1"] - table.entry(layer, probe).top1
            if drop >= collapse_drop:
                for c in table.configs:
                    if c.a_bits <= a_bits:
                        pruned[f"{layer}/{c.name}"] = f"top-1 collapses at A{a_bits} ({probe.name}: -{drop:.1f} points)"
                break
    return pruned
