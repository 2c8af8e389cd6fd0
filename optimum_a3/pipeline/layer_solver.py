"""Solve one decoder layer: original weights + statistics + target dims -> compressed layer weights.

This is the glue between the pure solvers (``solvers``) and the model: it converts Hugging Face
``nn.Linear`` weights (out, in) to the method's (in, out) notation and back, carries biases, and casts
the result to the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..math import solvers
from ..models.adapters import Geometry
from ..math.budget import LayerDims
from ..config import A3Config
from .statistics import LayerStatistics, OutputFit


def _w(linear: nn.Linear) -> torch.Tensor:
    """Method notation (in, out), float64."""
    return linear.weight.detach().to(torch.float64).T


def _bias_row(b: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """A bias as the extra input row of the augmented weight (zeros when the projection has none)."""
    return weight.new_zeros(1, weight.shape[1]) if b is None else b[None]


class _Entries:
    """Collects compressed-layer state-dict entries in the layer's dtype, in HF's (out, in) layout."""

    def __init__(self, adapter, layer: nn.Module):
        self.lin = adapter.linears(layer)
        self.paths = adapter.linear_paths
        self.dtype = self.lin["q"].weight.dtype
        self.out: dict[str, torch.Tensor] = {}

    def put(self, name: str, weight_in_out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out[f"{self.paths[name]}.weight"] = weight_in_out.T.contiguous().to(self.dtype)
        if bias is not None:
            self.out[f"{self.paths[name]}.bias"] = bias.contiguous().to(self.dtype)

    def weight(self, name: str) -> torch.Tensor:
        return _w(self.lin[name])

    def bias(self, name: str) -> torch.Tensor | None:
        b = self.lin[name].bias
        return None if b is None else b.detach().to(torch.float64)


def solve_layer(adapter, layer: nn.Module, stats: LayerStatistics, geometry: Geometry, dims: LayerDims,
                config: A3Config) -> dict[str, torch.Tensor]:
    """State-dict entries (relative to the layer) of the compressed layer, in the layer's dtype.

    Entries not returned (norms, o_proj/down_proj biases) are copied unchanged by the caller.
    """
    out = solve_attention(adapter, layer, stats, geometry, dims, config)
    out.update(solve_mlp(adapter, layer, stats, dims, config))
    return out


def solve_attention(adapter, layer: nn.Module, stats: LayerStatistics, geometry: Geometry, dims: LayerDims,
                    config: A3Config) -> dict[str, torch.Tensor]:
    """The q/k/v/o entries (and ``rope_pairs``) of the compressed layer; needs the attention statistics only."""
    e = _Entries(adapter, layer)
    h, g, hd = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    r_x = stats.attn_input_autocorr

    # --- QK: keep whole rotary pairs (§3a); at full size the identity selection keeps the weights.
    # With q/k biases (Qwen2) the pre-RoPE energies are those of [x, 1] @ [W; b] (method §6).
    w_q, w_k, r_qk = e.weight("q"), e.weight("k"), r_x
    if e.bias("q") is not None or e.bias("k") is not None:
        w_q, w_k = (torch.cat([w, _bias_row(e.bias(name), w)]) for name, w in (("q", w_q), ("k", w_k)))
        r_qk = stats.augmented_attn_input_autocorr()
    keep = solvers.select_rope_pairs(w_q, w_k, r_qk, h, g, dims.head_dim_qk)
    kept_dims = solvers.rope_kept_dims(keep, hd)
    for name, heads in (("q", h), ("k", g)):
        b = e.bias(name)
        e.put(name, solvers.gather_head_columns(e.weight(name), heads, kept_dims),
              None if b is None else solvers.gather_head_columns(b[None], heads, kept_dims)[0])
    e.out[adapter.rope_pairs_path] = keep.to(torch.long)

    # --- OV (§4). A v_proj bias adds the constant Σ_h b_v,g(h) W_o,h to the output (attention rows
    # sum to one), so it folds exactly into the o_proj bias and the solvers see weights only.
    w_v, w_o = e.weight("v"), e.weight("o")
    o_bias = e.bias("o")
    b_v = e.bias("v")
    if b_v is not None:
        per_query_head = b_v.view(g, 1, hd).expand(g, h // g, hd).reshape(h, 1, hd)
        folded = (per_query_head @ w_o.view(h, hd, -1)).sum(dim=0)[0]
        o_bias = folded if o_bias is None else o_bias + folded
    if dims.head_dim_vo == hd:
        new_v, new_o = w_v, w_o
    elif geometry.is_mha:
        new_v, new_o = solvers.solve_ov_mha(w_v, w_o, stats.head_output_autocorr, h, dims.head_dim_vo, config.eig_floor)
    else:
        new_v, new_o = solvers.solve_ov_gqa(w_v, w_o, r_x, h, g, dims.head_dim_vo, config.eig_floor)
    e.put("v", new_v, None if b_v is None else torch.zeros(new_v.shape[1], dtype=torch.float64))
    e.put("o", new_o, o_bias)
    return e.out


def mlp_kept_channels(adapter, layer: nn.Module, stats: LayerStatistics, dims: LayerDims) -> torch.Tensor:
    """The MLP channels the compressed layer keeps (§5), in ascending order; needs the MLP statistics only."""
    w_down = _Entries(adapter, layer).weight("down")
    return solvers.select_mlp_channels(w_down, stats.down_input_sq_mean, dims.intermediate_size)


def solve_mlp(adapter, layer: nn.Module, stats: LayerStatistics, dims: LayerDims,
              config: A3Config, kept: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The gate/up/down entries of the compressed layer: column selection (§5), optional least-squares
    refit of down_proj (§6). Needs the MLP statistics only; ``kept`` (from :func:`mlp_kept_channels`)
    when the caller needs the selection too."""
    e = _Entries(adapter, layer)
    w_down = e.weight("down")
    if kept is None:
        kept = mlp_kept_channels(adapter, layer, stats, dims)
    for name in ("gate", "up"):
        b = e.bias(name)
        e.put(name, e.weight(name)[:, kept], None if b is None else b[kept])
    if config.mlp_refit and dims.intermediate_size < w_down.shape[0]:
        new_down = solvers.refit_down_proj(w_down, stats.down_input_autocorr, kept, config.refit_damping)
    else:
        new_down = w_down[kept]
    e.put("down", new_down, e.bias("down"))
    return e.out


def refit_to_teacher(adapter, entries: dict[str, torch.Tensor], name: str, fit: OutputFit,
                     config: A3Config) -> dict[str, torch.Tensor]:
    """``entries`` with projection ``name`` ("o" or "down") refit by least squares to the teacher targets
    of ``fit``, starting from (and damped towards) the weights in ``entries``; its bias is kept."""
    key = f"{adapter.linear_paths[name]}.weight"
    start = entries[key]
    fit = fit.to(start.device)
    new = solvers.refit_to_targets(fit.gram, fit.cross, start.to(torch.float64).T, config.teacher_damping)
    return {**entries, key: new.T.contiguous().to(start.dtype)}
