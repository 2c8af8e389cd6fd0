"""Mixed ranks: per-layer, per-component dims under one global parameter budget (method page §6).

Each solver knows its analytical residual error as a function of the kept dim:
  * QK: the discarded rotary-pair scores ``Σ λ`` (score error, logit² units, summed over KV groups);
  * OV: the discarded squared singular values ``Σ σ²`` (attention-output error energy);
  * MLP: the discarded channel scores ``Σ m_d[i]·||W_down[i]||²`` (MLP-output error energy).
The marginal cost of removing one more unit (a rotary pair, a v/o dim, an MLP channel) is
non-decreasing within a tensor, so the greedy removal of the cheapest unit per parameter is optimal
for this separable convex problem. Errors are made comparable across layers by dividing by the
component's total energy (``normalize="self"``; dividing by the residual-stream energy ``E||h||²``
instead measured worse on SmolLM2, see README). OV and MLP share one pool; QK errors live in score
units and form their own pool. Each pool removes exactly the parameters the uniform
§7 allocation removes (overshoot < one unit), so the result has the uniform model's size. Bounds per track
(the KV cap, ``max_factor``'s trust region around the uniform dims) shorten its curve at both ends; the
uniform dims always lie inside them, so the budget stays reachable.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from . import solvers
from .budget import DIM_FIELDS, LayerDims


@dataclass
class Track:
    """One shrinkable dimension: ``marginal[k]`` is the error added by removing its k-th unit."""

    layer: int
    component: str          # "qk", "ov" or "mlp" (the components of A3Config)
    full: int               # original dim
    step: int               # dims per unit (2 for RoPE pairs)
    params_per_unit: int
    marginal: torch.Tensor  # non-decreasing, one entry per removable unit


def greedy_allocate(tracks: list[Track], params_to_remove: int) -> dict[tuple[int, str], int]:
    """Remove the cheapest units per parameter until ``params_to_remove`` is reached; return kept dims."""
    removed_units = {(t.layer, t.component): 0 for t in tracks}
    heap = [(t.marginal[0].item() / t.params_per_unit, i) for i, t in enumerate(tracks) if len(t.marginal)]
    heapq.heapify(heap)
    removed = 0
    while removed < params_to_remove and heap:
        _, i = heapq.heappop(heap)
        t = tracks[i]
        key = (t.layer, t.component)
        removed_units[key] += 1
        removed += t.params_per_unit
        k = removed_units[key]
        if k < len(t.marginal):
            heapq.heappush(heap, (t.marginal[k].item() / t.params_per_unit, i))
    return {(t.layer, t.component): t.full - t.step * removed_units[(t.layer, t.component)] for t in tracks}


def layer_tracks(layer_idx: int, w: dict[str, torch.Tensor], stats, geometry, components,
                 normalize: str = "self") -> list[Track]:
    """Error tracks of one layer from its weights (method notation, (in, out)) and statistics."""
    d, h, g, hd = geometry.hidden_size, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    tracks = []
    residual = max(stats.residual_sq_mean, torch.finfo(torch.float64).tiny)

    def scale(marginal_with_last):
        total = marginal_with_last.sum() if normalize == "self" else residual
        return marginal_with_last[:-1] / max(float(total), torch.finfo(torch.float64).tiny)

    if "qk" in components:
        scores = solvers.rope_pair_scores(w["q"], w["k"], stats.attn_input_autocorr, h, g) / hd  # softmax scale²
        marginal = scores.sort(dim=-1).values.sum(dim=0)
        marginal = marginal[:-1] if normalize == "residual" else scale(marginal)  # keep at least one pair
        tracks.append(Track(layer_idx, "qk", hd, 2, 2 * d * (h + g), marginal))
    if "ov" in components:
        spectrum = solvers.ov_error_spectrum(w["v"], w["o"], h, g, r_x=stats.attn_input_autocorr,
                                             g_z=stats.head_output_autocorr if geometry.is_mha else None)
        marginal = scale(spectrum.flip(-1).sum(dim=0))
        tracks.append(Track(layer_idx, "ov", hd, 1, d * (g + h), marginal))
    if "mlp" in components:
        scores = solvers.mlp_channel_scores(w["down"], stats.down_input_sq_mean)
        marginal = scale(scores.sort().values)
        tracks.append(Track(layer_idx, "mlp", len(scores), 1, 3 * d, marginal))
    return tracks


def _removed_params(tracks: list[Track], dims: dict[tuple[int, str], int]) -> int:
    return sum((t.full - dims[(t.layer, t.component)]) // t.step * t.params_per_unit for t in tracks)


def mixed_dims(tracks: list[Track], uniform: list[LayerDims], pools=(("qk",), ("ov", "mlp")),
               capped: tuple[str, ...] = (), max_factor: float | None = None) -> list[LayerDims]:
    """Per-layer dims with the uniform allocation's parameter count, redistributed by error.

    ``capped`` components never grow past their uniform dims (e.g. ``("qk", "ov")``: the key/value widths,
    so the KV cache is at most the uniform model's). ``max_factor`` keeps every dim within that factor of
    its uniform dim (in ``[uniform / f, uniform * f]``, whole units): a trust region around the uniform
    allocation for when the error estimates are not trusted far from the dims they were measured at.
    A track's units above its upper bound count as removed already."""
    uniform_dims = {(t.layer, t.component): uniform[t.layer].of(t.component) for t in tracks}
    result = {(i, c): u.of(c) for i, u in enumerate(uniform) for c in DIM_FIELDS}
    for pool in pools:
        pool_tracks = [t for t in tracks if t.component in pool]
        budget = _removed_params(pool_tracks, uniform_dims)
        bounded = [_bounded(t, uniform_dims[(t.layer, t.component)], t.component in capped, max_factor)
                   for t in pool_tracks]
        budget -= _removed_params(pool_tracks, {(t.layer, t.component): t.full for t in bounded})
        result.update(greedy_allocate(bounded, budget))
    return [LayerDims(result[(i, "qk")], result[(i, "ov")], result[(i, "mlp")]) for i in range(len(uniform))]


def _bounded(track: Track, uniform: int, capped: bool, max_factor: float | None) -> Track:
    """``track`` started at its upper bound (the units above it removed already, never grown back) and
    ending at its lower bound (no unit removed below it); the uniform dim is always inside."""
    high, low = track.full, track.full - track.step * len(track.marginal)
    if capped:
        high = uniform
    if max_factor is not None:
        units = lambda dim: -(-dim // track.step)  # noqa: E731  whole units, rounded up
        high = min(high, max(uniform, track.step * int(uniform * max_factor // track.step)))
        low = max(low, min(uniform, track.step * units(int(-(-uniform // max_factor)))))
    removed = (track.full - high) // track.step
    return Track(track.layer, track.component, high, track.step, track.params_per_unit,
                 track.marginal[removed:removed + (high - low) // track.step])


def scaled_by_sensitivity(tracks: list[Track], probe_dims: dict[tuple[int, str], int],
                          kl: dict[tuple[int, str], float]) -> list[Track]:
    """The tracks with their errors in measured units: each track's analytical curve keeps its shape and
    is scaled so that removing the units down to ``probe_dims[key]`` costs the measured ``kl[key]``.

    A track with nothing removed at its probe dim (so nothing measured) takes the median scale of its
    component's measured tracks. The result goes to :func:`mixed_dims` with one pool for all components.
    """
    scales: dict[tuple[int, str], float] = {}
    for t in tracks:
        key = (t.layer, t.component)
        units = (t.full - probe_dims[key]) // t.step
        error = float(t.marginal[:units].sum()) if units > 0 else 0.0
        if units > 0 and error > 0.0:
            scales[key] = max(kl[key], 0.0) / error
    by_component: dict[str, list[float]] = {}
    for (_, component), scale in scales.items():
        by_component.setdefault(component, []).append(scale)
    scaled = []
    for t in tracks:
        scale = scales.get((t.layer, t.component))
        if scale is None:
            measured = sorted(by_component.get(t.component, [1.0]))
            scale = measured[len(measured) // 2]
        scaled.append(Track(t.layer, t.component, t.full, t.step, t.params_per_unit, t.marginal * scale))
    return scaled
