"""Range estimation for activations: min-max, percentile and quantile-search observers."""

from __future__ import annotations

import torch

from hyfx.quant.quantizers import log2_params, twin_params, uniform_params
from hyfx.quant.spec import QuantSpec


class MinMaxObserver:
    """Running min and max, per tensor or per channel (`axis`)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return x.min(), x.max()
        flat = x.detach().transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = self._reduce(x)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data: the calibration loader was empty")
        return self.lo, self.hi


class PercentileObserver(MinMaxObserver):
    """Clips the range to the given percentiles of every batch, averaged over batches (per tensor)."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20):
        super().__init__(None)
        self.percentile = percentile
        self.max_samples = max_samples
        self._los: list[torch.Tensor] = []
        self._his: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        if flat.numel() > self.max_samples:  # torch.quantile caps its input size
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: self.max_samples]]
        q = torch.tensor([100 - self.percentile, self.percentile]) / 100
        lo, hi = torch.quantile(flat, q)
        self._los.append(lo)
        self._his.append(hi)
        self.lo, self.hi = torch.stack(self._los).mean(), torch.stack(self._his).mean()


SEARCH_QUANTILES = (0.999, 0.9999, 0.99999)


def best_quantile_range(rows: torch.Tensor, spec: QuantSpec, quantiles=SEARCH_QUANTILES
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `rows` (one row per channel; one row: per tensor), the range [q(1-p), q(p)] among `quantiles`
    whose uniform quantization on `spec`'s grid has the least squared error (RepQ-ViT's percentile search)."""
    rows = rows.float()
    best_err = torch.full((rows.shape[0],), float("inf"))
    best_lo, best_hi = rows.min(1).values, rows.max(1).values
    for p in quantiles:
        qs = torch.quantile(rows, torch.tensor([1.0 - p, p]), dim=1)
        lo, hi = qs[0], qs[1]
        scale, zero_point = uniform_params(lo, hi, spec)
        scale, zero_point = scale.reshape(-1, 1), zero_point.reshape(-1, 1).float()
        q = torch.clamp(torch.round(rows / scale) + zero_point, spec.qmin, spec.qmax)
        err = ((q - zero_point) * scale - rows).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


class QuantileSearchObserver(MinMaxObserver):
    """RepQ-ViT's activation range: from the first batch, the [q(1-p), q(p)] range of least quantization error
    (`best_quantile_range`), per tensor or per channel (`axis`); at most `max_samples` values per channel."""

    def __init__(self, spec: QuantSpec, axis: int | None = None, max_samples: int = 1 << 16):
        super().__init__(axis)
        self.spec = spec
        self.max_samples = max_samples
        self._rows: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if self._rows is not None:
            return
        x = x.detach().float()
        rows = x.reshape(1, -1) if self.axis is None else x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        if rows.shape[1] > self.max_samples:
            pick = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))[: self.max_samples]
            rows = rows[:, pick]
        self._rows = rows
        lo, hi = best_quantile_range(rows, self.spec)
        self.lo, self.hi = (lo[0], hi[0]) if self.axis is None else (lo, hi)


def make_observer(spec: QuantSpec, method: str = "minmax") -> MinMaxObserver:
    if method == "percentile":
        return PercentileObserver()
    if method == "search":
        return QuantileSearchObserver(spec, spec.axis if spec.granularity == "channel" else None)
    if method != "minmax":
        raise ValueError(f"unknown observer {method!r}")
    return MinMaxObserver(spec.axis if spec.granularity == "channel" else None)


def spec_from_range(spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> QuantSpec:
    """Fill a spec's scale and zero point from an observed range."""
    if spec.kind == "log2":
        delta, zero_point = log2_params(float(lo.min()), float(hi.max()), spec.bits, spec.eps)
        return spec.with_params([delta], [zero_point])
    if spec.kind == "log_sqrt2":  # Δ at the top of the range: codes only go down from it
        return spec.with_params([max(float(hi.max()), 1e-8)], [0])
    if spec.kind == "twin":
        return spec.with_params(twin_params(float(lo.min()), float(hi.max()), spec.bits, spec.signed), [0, 0])
    scale, zero_point = uniform_params(lo, hi, spec)
    return spec.with_params(scale.reshape(-1).tolist(), zero_point.reshape(-1).tolist())
