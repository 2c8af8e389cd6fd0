"""Measured sensitivity for the mixed allocation: how far the model's next-token distribution moves when
one component of one layer alone is compressed.

For every layer ``l`` and component ``c`` (qk, ov, mlp), the component is solved at its uniform dim and put,
for the probe only, into the ORIGINAL model in a zero-padded form that computes what the compressed layer
computes (dropped rotary pairs, v/o dims and MLP channels become zero rows or columns of the original-shaped
weights). The rest of the model runs from layer ``l``'s cached input, and the mean KL divergence of its
next-token distribution from the original model's, over the probe tokens, is the figure. The original
weights are put back after each probe.

The allocator (:func:`optimum_a3.math.allocation.scaled_by_sensitivity`) turns each figure into a per-unit
price: the analytical error curve of the component keeps its shape, its scale becomes "KL per unit of
analytical error", so that layers and components are compared by their effect on the output.
(Qwen3's q/k RMSNorm normalizes over all head dims, so there the zero-padded q/k differ slightly from a
model that keeps fewer dims: an estimate, as every probe is.)
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..math import solvers
from ..math.budget import LayerDims
from ..models.adapters import Geometry
from .distributed import Ranks
from .forward import LayerInput, capture_first_layer_inputs, layer_output
from .layer_solver import mlp_kept_channels, solve_attention, solve_mlp
from .statistics import LayerStatistics

# How many probe tokens the final norm + lm_head turn into log-probabilities at once (vocab-sized rows).
_HEAD_CHUNK = 512


class SensitivityProbe:
    """The original model's layer inputs and next-token probabilities on the probe tokens, cached once,
    and :meth:`kl` of the model with one layer's weights replaced."""

    def __init__(self, model: nn.Module, adapter, input_ids: torch.Tensor, *, batch_size: int, device=None):
        self.model, self.adapter = model, adapter
        self.layers = adapter.layers(model)
        device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        with torch.inference_mode():
            batches = capture_first_layer_inputs(model, self.layers, input_ids, batch_size, device)
            self.inputs: list[list[LayerInput]] = []
            for layer in self.layers:
                self.inputs.append(batches)
                batches = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in batches]
            # Per batch: the original next-token probabilities p and, per token, sum(p log p), so that a probe
            # needs only sum(p log q) = p . logits - logsumexp(logits) per token.
            self.reference: list[tuple[torch.Tensor, torch.Tensor]] = []
            for hidden, _ in batches:
                log_p = torch.cat([torch.log_softmax(logits, dim=-1) for logits in self._logits(hidden)])
                probs = log_p.exp()
                self.reference.append((probs, _row_dot(probs, log_p)))

    def _logits(self, hidden: torch.Tensor):
        """Float32 logits of ``hidden``'s tokens, ``_HEAD_CHUNK`` tokens at a time (vocab-sized rows)."""
        norm, head = self.adapter.decoder(self.model).norm, self.model.get_output_embeddings()
        flat = hidden.reshape(-1, hidden.shape[-1])
        for i in range(0, flat.shape[0], _HEAD_CHUNK):
            yield head(norm(flat[i:i + _HEAD_CHUNK])).float()

    def kl(self, idx: int, replacements: dict[nn.Parameter, torch.Tensor]) -> float:
        """Mean KL(original ‖ probed) per probe token with ``replacements`` (parameter -> value, same shape)
        in place in layers >= ``idx``; the parameters get their values back afterwards."""
        saved = {p: p.detach().clone() for p in replacements}
        total, count = None, 0
        try:
            with torch.no_grad():
                for p, value in replacements.items():
                    p.copy_(value)
            with torch.inference_mode():
                for (hidden, kwargs), (probs, p_log_p) in zip(self.inputs[idx], self.reference):
                    for layer in self.layers[idx:]:
                        hidden = layer_output(layer, hidden, kwargs)
                    start = 0
                    for logits in self._logits(hidden):
                        rows = slice(start, start + logits.shape[0])
                        p_log_q = _row_dot(probs[rows], logits) - torch.logsumexp(logits, dim=-1).to(torch.float64)
                        chunk = (p_log_p[rows] - p_log_q).sum()  # stays on the device: one transfer per probe
                        total = chunk if total is None else total + chunk
                        start = rows.stop
                    count += probs.shape[0]
        finally:
            with torch.no_grad():
                for p, value in saved.items():
                    p.copy_(value)
        return max(total.item() / count, 0.0)  # float noise can leave a tiny negative at ratio 0


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot products of two (tokens, vocab) matrices, in float64, without a vocab-sized temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(-1).to(torch.float64)


def _scatter_rows(rows: torch.Tensor, full: int, groups: int, index: torch.Tensor) -> torch.Tensor:
    """``rows`` (groups*k, ...) placed at row ``index[g]`` (k positions) of each group of ``full`` rows."""
    k = index.shape[1]
    out = rows.new_zeros(groups, full, *rows.shape[1:])
    out[torch.arange(groups)[:, None], index] = rows.reshape(groups, k, *rows.shape[1:])
    return out.reshape(groups * full, *rows.shape[1:])


def padded_component(adapter, layer: nn.Module, stats: LayerStatistics, geometry: Geometry, dims: LayerDims,
                     component: str, config) -> dict[nn.Parameter, torch.Tensor]:
    """The original-shaped values of ``layer``'s parameters that compute what the layer computes with only
    ``component`` compressed to its dim in ``dims`` (the other components kept whole)."""
    lin = adapter.linears(layer)
    h, g, hd = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    full = LayerDims(hd, hd, lin["down"].in_features)
    out: dict[nn.Parameter, torch.Tensor] = {}

    def put(name: str, key: str, value: torch.Tensor):
        out[getattr(lin[name], key)] = value.to(getattr(lin[name], key).dtype)

    def entry(entries, name, key="weight"):
        return entries.get(f"{adapter.linear_paths[name]}.{key}")

    if component == "qk":
        entries = solve_attention(adapter, layer, stats, geometry, LayerDims(dims.head_dim_qk, hd, full.intermediate_size),
                                  config)
        kept = solvers.rope_kept_dims(entries[adapter.rope_pairs_path], hd)   # (g, k)
        for name, heads in (("q", h), ("k", g)):
            index = kept.repeat_interleave(heads // kept.shape[0], dim=0)
            put(name, "weight", _scatter_rows(entry(entries, name), hd, heads, index))
            if entry(entries, name, "bias") is not None:
                put(name, "bias", _scatter_rows(entry(entries, name, "bias"), hd, heads, index))
    elif component == "ov":
        entries = solve_attention(adapter, layer, stats, geometry, LayerDims(hd, dims.head_dim_vo, full.intermediate_size),
                                  config)
        k = dims.head_dim_vo
        first = torch.arange(k).expand(h, k)
        put("v", "weight", _scatter_rows(entry(entries, "v"), hd, g, first[:g]))
        if entry(entries, "v", "bias") is not None:
            put("v", "bias", _scatter_rows(entry(entries, "v", "bias"), hd, g, first[:g]))
        o_weight = _scatter_rows(entry(entries, "o").T, hd, h, first).T
        o_bias = entry(entries, "o", "bias")  # with a v_proj bias, that bias folded in (layer_solver)
        if o_bias is not None and lin["o"].bias is not None:
            put("o", "bias", o_bias)
        elif o_bias is not None:
            # No o_proj bias to hold the fold: one padded dim per head carries it instead. A v_proj bias
            # of 1 there makes every head's attention output 1 in that dim (attention rows sum to one),
            # and o_proj's column for it adds o_bias / heads per head.
            v_bias = out[lin["v"].bias].clone()
            v_bias.view(g, hd)[:, k] = 1.0
            out[lin["v"].bias] = v_bias
            o_weight.view(-1, h, hd)[:, :, k] = (o_bias / h).to(o_weight.dtype)[:, None]
        put("o", "weight", o_weight)
    elif component == "mlp":
        mlp_dims = LayerDims(hd, hd, dims.intermediate_size)
        kept = mlp_kept_channels(adapter, layer, stats, mlp_dims)
        entries = solve_mlp(adapter, layer, stats, mlp_dims, config, kept=kept)
        put("down", "weight", _scatter_rows(entry(entries, "down").T, full.intermediate_size, 1, kept[None]).T)
    else:
        raise ValueError(f"unknown component {component!r}")
    return out


def measure_sensitivity(probe: SensitivityProbe, adapter, geometry: Geometry, layers, statistics: list[LayerStatistics],
                        dims: list[LayerDims], components, config, progress: bool = True,
                        ranks: Ranks | None = None) -> dict[tuple[int, str], float]:
    """KL of every (layer, component) compressed alone to its dim in ``dims``; ``layers[idx]`` is the
    original layer (in the probe's model), ``statistics[idx]`` its statistics.

    Under ``torchrun`` the probes, not the probe tokens, are shared: rank r runs every ``world_size``-th
    probe on all the probe tokens and the figures are summed over the ranks, so that every rank gets the
    very figures one process measures (the probe tokens may be a single window)."""
    ranks = ranks or Ranks()
    full = {"qk": geometry.head_dim, "ov": geometry.head_dim, "mlp": None}
    jobs = [(idx, c) for idx in range(geometry.num_layers) for c in components]
    figures = torch.zeros(len(jobs), dtype=torch.float64)
    mine = [k for k in range(len(jobs)) if k % ranks.world_size == ranks.rank]
    for k in tqdm(mine, desc="A3 sensitivity probes", unit="probe", disable=not progress):
        idx, component = jobs[k]
        layer = layers[idx]
        target = dims[idx].of(component)
        whole = full[component] or adapter.linears(layer)["down"].in_features
        if target >= whole:
            continue  # nothing removed at this dim: nothing to measure (0)
        stats = statistics[idx].to(config.device or statistics[idx].attn_input_autocorr.device)
        figures[k] = probe.kl(idx, padded_component(adapter, layer, stats, geometry, dims[idx], component, config))
    ranks.all_reduce_([figures])  # each figure is measured on one rank, zero on the others
    return {job: figures[k].item() for k, job in enumerate(jobs)}
