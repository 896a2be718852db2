"""Scale search shared by the reconstruction recipes (Q-HyViT, PTQ4ViT, EasyQuant).

A search option is a quantizer template (granularity, scheme, kind) with a grid of candidate parameters; every
candidate of an option is applied at once (a leading candidate dimension, evaluated in chunks), the layer's
output is computed for the whole chunk in one batched op (see problems.py), and an objective scores each
candidate. Per-channel weight options whose objective decomposes over output channels pick each channel's
best candidate independently. Weights and activations are searched alternately for a number of rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyfx.errors import HyfxError
from hyfx.quant.quantizers import MIN_SCALE, twin_uniform
from hyfx.quant.spec import QuantSpec

CHUNK_ELEMENTS = 1 << 22  # candidate chunk: about 16 MB of float32 per intermediate


def grid(alpha: float, beta: float, n: int) -> torch.Tensor:
    """n factors on the linear grid [alpha, beta] (times the min-max scale); a zero factor is left out."""
    if n < 1 or beta <= 0 or alpha > beta:
        raise HyfxError(f"bad search grid alpha={alpha}, beta={beta}, n={n}: need 0 <= alpha <= beta, beta > 0, n >= 1")
    factors = torch.linspace(alpha, beta, n, dtype=torch.float64)
    return factors[factors > 0].float()


def _shape_for(x: torch.Tensor, k: int, axis: int | None, per_position: bool) -> list[int]:
    shape = [k] + [1] * x.dim()
    if per_position:
        shape[axis + 1] = -1
    return shape


class UniformCandidates:
    """Uniform quantizers on a scale grid: factor × the min-max scale of the range, per channel or per tensor.

    Symmetric: scale = f·max|x|/qmax, zero point 0. Asymmetric: scale = f·(hi − lo)/(qmax − qmin) with zero kept
    representable (lo ≤ 0 ≤ hi, so padding and ReLU zeros stay exact and the zero point never leaves
    [qmin, qmax]); the zero point is fixed by lo/(hi − lo), so a factor shrinks both ends of the range together.
    """

    def __init__(self, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor, factors: torch.Tensor):
        self.spec = spec.uncalibrated()
        lo, hi = lo.float().reshape(-1), hi.float().reshape(-1)
        if spec.granularity == "tensor":
            lo, hi = lo.min().reshape(1), hi.max().reshape(1)
        if spec.scheme == "symmetric":
            base = torch.maximum(lo.abs(), hi.abs()) / spec.qmax
            zero = torch.zeros_like(base)
        else:
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            base = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(MIN_SCALE)
            zero = (spec.qmin - torch.round(lo / base)).clamp(spec.qmin, spec.qmax)
        self.scale = (factors[:, None] * base[None]).clamp_min(MIN_SCALE)  # (S, C)
        self.zero = zero  # (C,)
        self.factors = factors

    def with_range(self, lo: torch.Tensor, hi: torch.Tensor) -> UniformCandidates:
        """The same quantizer and grid on another range (e.g. one half of the calibration data)."""
        return UniformCandidates(self.spec, lo, hi, self.factors)

    @property
    def size(self) -> int:
        return self.scale.shape[0]

    @property
    def channels(self) -> int:
        return self.scale.shape[1]

    def _fake_quant(self, x, scale, axis, index) -> torch.Tensor:
        zero = self.zero
        per_position = scale.shape[1] > 1
        if per_position and index is not None:
            scale, zero = scale[:, index], zero[index]
        shape = _shape_for(x, scale.shape[0], axis, per_position)
        s = scale.reshape(shape)
        q = (x.unsqueeze(0) / s).round_()
        if self.spec.scheme == "symmetric":
            q.clamp_(self.spec.qmin, self.spec.qmax)
        else:  # clamp(round(x/s) + z, qmin, qmax) - z, in one pass
            z = zero.reshape(shape[1:]) if per_position else zero.reshape(())
            q = torch.clamp(q, self.spec.qmin - z, self.spec.qmax - z)
        return q.mul_(s)

    def quantize(self, x: torch.Tensor, idx: torch.Tensor, axis: int | None, index: torch.Tensor | None) -> torch.Tensor:
        """Candidates `idx` ((k,), or (k, C) for one grid index per channel) applied to x: (k, *x.shape)."""
        scale = self.scale.gather(0, idx) if idx.dim() == 2 else self.scale[idx]
        return self._fake_quant(x, scale, axis, index)

    def params(self, choice: torch.Tensor) -> torch.Tensor:
        """The scale vector (C,) of a choice: one candidate index, or one index per channel."""
        if choice.dim() == 0:
            return self.scale[choice]
        return self.scale.gather(0, choice[None])[0]

    def apply(self, x, choice, axis, index) -> torch.Tensor:
        return self._fake_quant(x, self.params(choice)[None], axis, index)[0]

    def spec_at(self, choice: torch.Tensor) -> QuantSpec:
        return self.spec.with_params(self.params(choice).tolist(), self.zero.round().long().tolist())

    def describe(self, choice: torch.Tensor) -> float:
        """The chosen factor (mean over channels for per-channel picks)."""
        return float(self.factors[choice].float().mean())


class TwinCandidates:
    """PTQ4ViT twin uniform quantizers: candidate (Δ1, Δ2) pairs, one per row of `deltas`."""

    def __init__(self, spec: QuantSpec, deltas: torch.Tensor, factors: torch.Tensor):
        if spec.kind != "twin":
            raise ValueError("TwinCandidates needs a twin spec")
        self.spec = spec.uncalibrated()
        self.deltas = deltas.float().clamp_min(MIN_SCALE)  # (S, 2)
        self.factors = factors

    @property
    def size(self) -> int:
        return self.deltas.shape[0]

    @property
    def channels(self) -> int:
        return 1

    def quantize(self, x, idx, axis, index) -> torch.Tensor:
        d = self.deltas[idx]
        shape = [len(idx)] + [1] * x.dim()
        return twin_uniform(x.unsqueeze(0), d[:, 0].reshape(shape), d[:, 1].reshape(shape), self.spec.bits,
                            self.spec.signed)

    def apply(self, x, choice, axis, index) -> torch.Tensor:
        return self.quantize(x, choice.reshape(1), axis, index)[0]

    def spec_at(self, choice: torch.Tensor) -> QuantSpec:
        return self.spec.with_params(self.deltas[choice].tolist(), [0, 0])

    def describe(self, choice: torch.Tensor) -> float:
        return float(self.factors[choice])


# ---------------------------------------------------------------------------------------------- objectives


class HessianObjective:
    """Σ g²·(y − y_fp)² over sampled rows (PTQ4ViT / Q-HyViT); with no gradients, the output MSE."""

    name = "hessian"

    def partial(self, y: torch.Tensor, target: torch.Tensor, g2: torch.Tensor | None) -> torch.Tensor:
        err = y.sub_(target).square_()
        if g2 is not None:
            err.mul_(g2)
        return err.sum(1).unsqueeze(-1)  # (k, C, 1)

    def reference(self, target: torch.Tensor) -> torch.Tensor:
        return torch.zeros(target.shape[-1])

    def score(self, part: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return part[..., 0]

    def total(self, per_channel_best: torch.Tensor) -> torch.Tensor:
        return per_channel_best.sum()


class CosineObjective:
    """EasyQuant: maximise the cosine similarity of the quantized and FP32 outputs (scored as −cos)."""

    name = "cosine"

    def partial(self, y, target, g2) -> torch.Tensor:
        return torch.stack(((y * target).sum(1), y.square().sum(1)), -1)  # (k, C, 2)

    def reference(self, target: torch.Tensor) -> torch.Tensor:
        return target.square().sum(0)

    def score(self, part, ref) -> torch.Tensor:
        return -part[..., 0] / (part[..., 1] * ref).clamp_min(1e-30).sqrt()

    def total(self, per_channel_best: torch.Tensor) -> torch.Tensor:
        return per_channel_best.mean()


@dataclass
class Choice:
    spec: QuantSpec
    value: torch.Tensor  # the side's data quantized with `spec`
    loss: float
    factor: float
    option: object = None  # the candidate set the choice came from
    index: torch.Tensor | None = None  # its grid index: a scalar, or one per channel


def _scores(problem, side: str, opt, idx: torch.Tensor, fixed, objective, chunk_elements: int) -> torch.Tensor:
    """Objective partials (k, C, m) of candidates `idx` ((k,) shared, or (k, C) per channel) of one option."""
    sd = problem.sides[side]
    k = max(1, chunk_elements // max(sd.data.numel(), problem.target.numel()))
    parts = []
    for start in range(0, len(idx), k):
        q = opt.quantize(sd.data, idx[start:start + k], sd.axis, sd.index)
        parts.append(objective.partial(problem.evaluate(side, q, fixed), problem.target, problem.g2))
    return torch.cat(parts)


def _pick(part: torch.Tensor, idx: torch.Tensor, opt, objective, ref, per_channel: bool) -> tuple[float, torch.Tensor]:
    """(total loss, grid index) of the best of the scored candidates: per channel or one for all."""
    if per_channel:
        loss = objective.score(part, ref)  # (k, C): each output channel depends on its own weights only
        rows = loss.argmin(0)
        total = objective.total(loss.gather(0, rows[None])[0])
        grid_idx = idx.gather(0, rows[None])[0] if idx.dim() == 2 else idx[rows]
        return float(total), grid_idx
    loss = objective.score(part.sum(1, keepdim=True), ref.sum().reshape(1))[:, 0]
    row = int(loss.argmin())
    return float(loss[row]), idx[row]


def _window(center: torch.Tensor, radius: int, size: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1)
    if center.dim() == 0:
        return (center + offsets).clamp(0, size - 1).unique()
    return (center[None] + offsets[:, None]).clamp(0, size - 1)  # (2r+1, C)


def search_side(problem, side: str, options: list, fixed: dict[str, torch.Tensor], objective,
                separable: bool = False, coarse: int | None = 12, previous: Choice | None = None,
                chunk_elements: int = CHUNK_ELEMENTS) -> Choice:
    """Best candidate of the best option for one side of a layer, the other sides held at `fixed`.

    With `coarse`, each option's grid is scored at `coarse` evenly spaced points, then the best option is scored
    at full resolution around its best point (per channel for separable per-channel options); with `previous`,
    only that option around that point. `coarse=None` scores every candidate of every option.

    When there are several options and the side carries the ranges of two halves of the calibration batches,
    the option is chosen by cross-validation: each option's grid is built from one half's ranges and scored on
    the samples of all batches, for both halves. A per-channel range that one half sees and the other does not
    (a channel firing on a few images) then costs the option its clipping error, as it would on new images.
    """
    full = problem
    problem = problem.view(side) if hasattr(problem, "view") else problem  # what the side is scored on
    ref = objective.reference(problem.target)
    sd = problem.sides[side]

    def per_channel(opt) -> bool:
        return separable and opt.channels > 1 and opt.channels == problem.target.shape[-1]

    def coarse_idx(opt) -> torch.Tensor:
        if coarse and opt.size > 2 * coarse:
            return torch.linspace(0, opt.size - 1, coarse).round().long().unique()
        return torch.arange(opt.size)

    def scored(opt) -> tuple[float, torch.Tensor]:
        idx = coarse_idx(opt)
        return _pick(_scores(problem, side, opt, idx, fixed, objective, chunk_elements), idx, opt, objective, ref,
                     per_channel(opt))

    if previous is not None:
        best_opt, center, radius = previous.option, previous.index, _radius(previous.option.size, coarse)
    else:
        validate = (len(options) > 1 and getattr(sd, "halves", None) is not None
                    and all(hasattr(o, "with_range") for o in options))
        ranked = []
        for opt in options:
            if validate:
                key = sum(scored(opt.with_range(*half))[0] for half in sd.halves)
                ranked.append((key, opt, None))
            else:
                total, grid_idx = scored(opt)
                ranked.append((total, opt, (total, grid_idx)))
        _, best_opt, found = min(ranked, key=lambda r: r[0])
        total, center = found if found is not None else scored(best_opt)
        radius = _radius(best_opt.size, coarse) if len(coarse_idx(best_opt)) < best_opt.size else 0
    if radius:
        idx = _window(center, radius, best_opt.size)
        total, center = _pick(_scores(problem, side, best_opt, idx, fixed, objective, chunk_elements), idx, best_opt,
                              objective, ref, per_channel(best_opt) and idx.dim() == 2)
    elif previous is not None:
        total = previous.loss
    sd = full.sides[side]
    return Choice(best_opt.spec_at(center), best_opt.apply(sd.data, center, sd.axis, sd.index), total,
                  best_opt.describe(center), best_opt, center)


def _radius(size: int, coarse: int | None) -> int:
    return 0 if not coarse or size <= 2 * coarse else -(-(size - 1) // (coarse - 1))


def alternate(problem, spaces: dict[str, list], order: list[str], rounds: int, objective,
              separable: tuple[str, ...] = (), coarse: int | None = 12) -> dict[str, Choice]:
    """Search the sides in `order` in turn for `rounds` rounds, each against the others' current choice.

    The first round picks each side's option (granularity, scheme) and scale; later rounds refine the scale of
    that option around the previous choice (with `coarse=None`, every round searches everything again).
    """
    fixed = {name: side.data for name, side in problem.sides.items()}
    choices: dict[str, Choice] = {}
    for r in range(rounds if len(order) > 1 else 1):
        for side in order:
            others = {k: v for k, v in fixed.items() if k != side}
            previous = choices.get(side) if coarse and r > 0 else None
            if previous is not None and per_channel_index(previous) and side not in separable:
                previous = None
            choice = search_side(problem, side, spaces[side], others, objective, side in separable, coarse, previous)
            fixed[side] = choice.value
            choices[side] = choice
    return choices


def per_channel_index(choice: Choice) -> bool:
    return choice.index is not None and choice.index.dim() > 0
