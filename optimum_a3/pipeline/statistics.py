"""Calibration statistics (method page §2): what they are and the hooks that accumulate them.

:class:`LayerStatistics` holds one decoder layer's float64 statistics; :class:`StatisticsCollector` is a
set of forward pre-hooks that sum them while a layer runs. Which forward runs, on which inputs, is the
business of the statistics sources (:mod:`optimum_a3.pipeline.sources`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import A3Error
from ..math.linalg import add_gram_upper_, mirror_gram_upper_


class NonFiniteStatisticsError(A3Error, RuntimeError):
    """Calibration produced NaN/Inf statistics (overflowing activations or a broken model)."""


@dataclass
class LayerStatistics:
    """Float64 statistics of one decoder layer (``T`` tokens)."""

    attn_input_autocorr: torch.Tensor            # R_x (d_model, d_model)
    down_input_sq_mean: torch.Tensor | None      # m_d (intermediate,); None while only attention is known
    head_output_autocorr: torch.Tensor | None    # G_z (num_heads, head_dim, head_dim), MHA OV only
    down_input_autocorr: torch.Tensor | None     # R_d (intermediate, intermediate), refit only
    num_tokens: int
    residual_sq_mean: float = float("nan")       # E||h||² of the residual stream entering the layer
    attn_input_mean: torch.Tensor | None = None  # E[x] (d_model,): with R_x, the statistics of [x, 1] (biases)

    @property
    def complete(self) -> bool:
        """False for the attention-only statistics that sequential calibration yields first."""
        return self.down_input_sq_mean is not None

    def augmented_attn_input_autocorr(self) -> torch.Tensor:
        """Autocorrelation of the input augmented with a constant 1, ``E[[x,1]ᵀ[x,1]]`` (method §6, biases)."""
        mean = self.attn_input_mean
        top = torch.cat([self.attn_input_autocorr, mean[:, None]], dim=1)
        bottom = torch.cat([mean, mean.new_ones(1)])[None]
        return torch.cat([top, bottom], dim=0)

    def check_finite(self, layer_idx: int) -> None:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
                raise NonFiniteStatisticsError(f"layer {layer_idx}: non-finite values in {name}")

    def to(self, device) -> LayerStatistics:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return LayerStatistics(**moved)


class StatisticsCollector:
    """Forward pre-hooks summing, in float64, outer products of the inputs of three projections: the
    attention input (q_proj), the attention-weighted values (o_proj, MHA only) and down_proj's input (each
    batch's products in float32 there, unless the model is float64)."""

    def __init__(self, num_heads: int, head_dim: int, want_head_autocorr: bool, want_down_autocorr: bool,
                 down_autocorr_stride: int = 1):
        """``down_autocorr_stride``: R_d sums every this many-th token of each batch, scaled by it (an estimate
        of the sum over every token at a fraction of the cost)."""
        self.num_heads, self.head_dim = num_heads, head_dim
        self.want_head_autocorr, self.want_down_autocorr = want_head_autocorr, want_down_autocorr
        self.down_autocorr_stride = down_autocorr_stride
        self.r_x = self.s_x = self.g_z = self.m_d = self.r_d = None
        self._r_d_batch = None  # one batch's R_d products in x's dtype, reused (intermediate², allocated once)
        self.tokens = 0

    @staticmethod
    def _rows(inputs) -> torch.Tensor:
        x = inputs[0]
        return x.reshape(-1, x.shape[-1]).to(torch.float64)

    def attention_input(self, module, inputs):
        x = self._rows(inputs)
        self.tokens += x.shape[0]
        if self.r_x is None:
            self.r_x, self.s_x = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1])
        add_gram_upper_(self.r_x, x)
        self.s_x.add_(x.sum(dim=0))

    def attention_output(self, module, inputs):
        z = self._rows(inputs).view(-1, self.num_heads, self.head_dim)
        outer = torch.einsum("thi,thj->hij", z, z)
        self.g_z = outer if self.g_z is None else self.g_z.add_(outer)

    def down_input(self, module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        if x.dtype != torch.float64:
            # Each batch's products in float32 (m_d 7x, R_d 2x faster than converting the batch to float64),
            # summed in float64.
            x = x.float()
        squares = x.square().sum(dim=0).to(torch.float64)
        self.m_d = squares if self.m_d is None else self.m_d.add_(squares)
        if self.want_down_autocorr:
            if self.r_d is None:
                self.r_d = x.new_zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                self._r_d_batch = x.new_zeros(self.r_d.shape)
            step = self.down_autocorr_stride
            self.r_d.add_(add_gram_upper_(self._r_d_batch.zero_(), x[::step]), alpha=step)

    def all_reduce_(self, ranks, part: str, owner: int | None = None) -> None:
        """Sum the partial sums of every rank (:class:`~optimum_a3.pipeline.distributed.Ranks`), in place:
        ``part`` "attention" (R_x, the input sum, G_z and the token count) or "mlp" (down_proj's input).
        With ``owner`` only that rank receives the sums (layer-parallel solving); the others' are undefined."""
        if not ranks.distributed:
            return
        if part == "attention":
            tokens = self.r_x.new_tensor([float(self.tokens)])
            tensors = [self.r_x, self.s_x, tokens] + ([self.g_z] if self.want_head_autocorr else [])
        else:
            tensors = [self.m_d] + ([self.r_d] if self.want_down_autocorr else [])
        ranks.all_reduce_(tensors) if owner is None else ranks.reduce_(tensors, owner)
        if part == "attention":
            self.tokens = int(tokens.item())

    def attention_result(self) -> LayerStatistics:
        """The attention statistics (``complete`` False)."""
        t = self.tokens
        return LayerStatistics(
            attn_input_autocorr=mirror_gram_upper_(self.r_x) / t,
            down_input_sq_mean=None,
            head_output_autocorr=self.g_z / t if self.want_head_autocorr else None,
            down_input_autocorr=None,
            num_tokens=t,
            attn_input_mean=self.s_x / t,
        )

    def with_mlp_result(self, stats: LayerStatistics) -> LayerStatistics:
        """``stats`` completed with the MLP statistics."""
        t = self.tokens
        return dataclasses.replace(
            stats, down_input_sq_mean=self.m_d / t,
            down_input_autocorr=mirror_gram_upper_(self.r_d) / t if self.want_down_autocorr else None)

    def result(self) -> LayerStatistics:
        return self.with_mlp_result(self.attention_result())


@dataclass
class OutputFit:
    """Float64 statistics of a least-squares refit of one projection (the teacher refit): its inputs ``X``
    in the compressed model and the outputs ``T`` it should give (the original model's, for the same
    tokens). Sums over the calibration tokens, not means: ``gram = XᵀX``, ``cross = XᵀT``, ``target_sq = ||T||²``."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_sq: float
    num_tokens: int

    def to(self, device) -> OutputFit:
        return dataclasses.replace(self, gram=self.gram.to(device), cross=self.cross.to(device))

    def check_finite(self, layer_idx: int) -> None:
        if not (torch.isfinite(self.gram).all() and torch.isfinite(self.cross).all()):
            raise NonFiniteStatisticsError(f"layer {layer_idx}: non-finite values in the teacher refit statistics")


class OutputFitCollector:
    """Sums an :class:`OutputFit` batch by batch (float64)."""

    def __init__(self):
        self.gram = self.cross = None
        self.target_sq, self.tokens = 0.0, 0

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        t = targets.reshape(-1, targets.shape[-1]).to(torch.float64)
        if self.gram is None:
            self.gram, self.cross = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1], t.shape[1])
        add_gram_upper_(self.gram, x)
        self.cross.addmm_(x.T, t)
        self.target_sq += t.pow(2).sum().item()
        self.tokens += x.shape[0]

    def result(self, ranks) -> OutputFit:
        """The sums over every rank (:class:`~optimum_a3.pipeline.distributed.Ranks`)."""
        totals = self.gram.new_tensor([self.target_sq, float(self.tokens)])
        if ranks.distributed:
            ranks.all_reduce_([self.gram, self.cross, totals])
        return OutputFit(mirror_gram_upper_(self.gram), self.cross, totals[0].item(), int(totals[1].item()))
