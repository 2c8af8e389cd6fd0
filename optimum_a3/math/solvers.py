"""A3 closed-form solvers (method page §3-§5), as pure functions over tensors.

Notation follows the method page: row vectors, ``y = x W`` with ``W`` of shape (in, out).
A Hugging Face ``nn.Linear.weight`` is ``Wᵀ``; converting is the caller's job (see ``surgery``).
Head ``h`` of a projection with ``head_dim`` columns per head owns columns ``h*head_dim:(h+1)*head_dim``;
query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)`` (Hugging Face ``repeat_kv``).
Everything is computed in float64; callers cast the results to the model dtype.
"""

from __future__ import annotations

import torch

from .linalg import DEFAULT_EIG_FLOOR, diag_gram, psd_roots


def _heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(in, num_heads*hd) -> (num_heads, in, hd)."""
    d_in, total = weight.shape
    return weight.to(torch.float64).reshape(d_in, num_heads, total // num_heads).permute(1, 0, 2)


def _unheads(per_head: torch.Tensor) -> torch.Tensor:
    """(num_heads, in, hd) -> (in, num_heads*hd)."""
    n, d_in, hd = per_head.shape
    return per_head.permute(1, 0, 2).reshape(d_in, n * hd)


def _check_rank(rank: int, full: int, what: str) -> None:
    if not 1 <= rank <= full:
        raise ValueError(f"{what} must be in [1, {full}], got {rank}")


# --------------------------------------------------------------------------------------------- QK
def rope_pair_scores(w_q: torch.Tensor, w_k: torch.Tensor, r_x: torch.Tensor,
                     num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """A3 score of every rotary pair per KV group, shape (num_kv_heads, head_dim/2).

    ``λ_j = e_q[j]·e_k[j]`` with ``e_q`` the pre-RoPE energy of query dim j summed over the group's
    query heads and ``e_k`` that of the shared key; pair p is (p, p+head_dim/2) (HF ``rotate_half``).
    """
    q_energy = diag_gram(_heads(w_q, num_heads), r_x)              # (H, hd)
    k_energy = diag_gram(_heads(w_k, num_kv_heads), r_x)           # (G, hd)
    q_energy = q_energy.reshape(num_kv_heads, num_heads // num_kv_heads, -1).sum(dim=1)
    dim_scores = q_energy * k_energy
    half = dim_scores.shape[-1] // 2
    return dim_scores[:, :half] + dim_scores[:, half:]


def select_rope_pairs(w_q: torch.Tensor, w_k: torch.Tensor, r_x: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim_qk: int) -> torch.Tensor:
    """Kept rotary frequency indices per KV group, sorted, shape (num_kv_heads, head_dim_qk/2)."""
    head_dim = w_k.shape[1] // num_kv_heads
    if head_dim_qk % 2:
        raise ValueError(f"head_dim_qk must be even with RoPE (whole rotary pairs are kept), got {head_dim_qk}")
    _check_rank(head_dim_qk, head_dim, "head_dim_qk")
    scores = rope_pair_scores(w_q, w_k, r_x, num_heads, num_kv_heads)
    keep = scores.topk(head_dim_qk // 2, dim=-1).indices
    return keep.sort(dim=-1).values


def rope_kept_dims(keep_pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head dims kept for given pair indices: ``cat(keep, keep + head_dim/2)`` (half-split layout)."""
    return torch.cat([keep_pairs, keep_pairs + head_dim // 2], dim=-1)


def gather_head_columns(weight: torch.Tensor, num_heads: int, dims_per_head: torch.Tensor) -> torch.Tensor:
    """Keep columns ``dims_per_head[h]`` of every head h of ``weight`` (in, num_heads*hd).

    ``dims_per_head`` has one row per head, or one row per KV group that is shared by the
    ``num_heads // rows`` consecutive heads of that group.
    """
    per_head = _heads(weight, num_heads).to(weight.dtype)
    rows = dims_per_head.shape[0]
    index = dims_per_head.repeat_interleave(num_heads // rows, dim=0)     # (H, r)
    index = index.unsqueeze(1).expand(-1, per_head.shape[1], -1)
    return _unheads(torch.gather(per_head, 2, index))


def solve_qk_svd(w_q: torch.Tensor, w_k: torch.Tensor, r_x: torch.Tensor, num_heads: int,
                 num_kv_heads: int, rank: int, eig_floor: float = DEFAULT_EIG_FLOOR
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """QK for models without RoPE (§3b): optimal rank-``rank`` fit of the scores per KV group.

    Minimises ``Σ_{h∈g} ||R_x^{1/2}(W_q,h W_k,gᵀ - W̃_q,h W̃_k,gᵀ) R_x^{1/2}||_F²`` in the exact
    head_dim-sized form: with ``G_q = Σ_h W_q,hᵀ R_x W_q,h`` and ``G_k = W_k,gᵀ R_x W_k,g``,
    ``SVD(G_q^{1/2} G_k^{1/2}) = P Σ Qᵀ``, ``W̃_q,h = W_q,h G_q^{-1/2} P_r``, ``W̃_k,g = W_k,g G_k^{-1/2} Q_r Σ_r``.
    Returns ``(w_q_new (in, H*rank), w_k_new (in, G*rank))``.
    """
    q_heads = _heads(w_q, num_heads)
    k_heads = _heads(w_k, num_kv_heads)
    _check_rank(rank, k_heads.shape[-1], "head_dim_qk")
    r = r_x.to(torch.float64)
    group = num_heads // num_kv_heads
    q_new, k_new = [], []
    for g in range(num_kv_heads):
        wq_g = q_heads[g * group:(g + 1) * group]                          # (group, in, hd)
        gram_q = (wq_g.transpose(-1, -2) @ r @ wq_g).sum(dim=0)
        gram_k = k_heads[g].T @ r @ k_heads[g]
        root_q, inv_root_q = psd_roots(gram_q, eig_floor)
        root_k, inv_root_k = psd_roots(gram_k, eig_floor)
        p, s, qh = torch.linalg.svd(root_q @ root_k)
        q_new.append(wq_g @ (inv_root_q @ p[:, :rank]))
        k_new.append(k_heads[g] @ (inv_root_k @ qh.T[:, :rank] * s[:rank]))
    return _unheads(torch.cat(q_new)), _unheads(torch.stack(k_new))


# --------------------------------------------------------------------------------------------- OV
def _ov_mha_core(w_o, g_z, num_heads, eig_floor):
    """``G_z,h^{-1/2}`` and ``SVD(G_z,h^{1/2} W_o,h)`` for every head."""
    hd = g_z.shape[-1]
    o_heads = w_o.to(torch.float64).reshape(num_heads, hd, -1)              # (H, hd, out)
    root, inv_root = psd_roots(g_z, eig_floor)
    return (inv_root, *torch.linalg.svd(root @ o_heads, full_matrices=False))


def _ov_gqa_core(w_v, w_o, r_x, num_heads, num_kv_heads, eig_floor):
    """``G_v^{-1/2}`` and ``SVD(G_v^{1/2} [W_o,h1 … W_o,hg])`` for every KV group."""
    v_heads = _heads(w_v, num_kv_heads)                                     # (G, in, hd)
    hd = v_heads.shape[-1]
    group, d_out = num_heads // num_kv_heads, w_o.shape[1]
    # (G, hd, group*out): the o_proj blocks of the group's query heads side by side
    o_groups = w_o.to(torch.float64).reshape(num_kv_heads, group, hd, d_out).permute(0, 2, 1, 3)
    o_groups = o_groups.reshape(num_kv_heads, hd, group * d_out)
    root, inv_root = psd_roots(v_heads.transpose(-1, -2) @ r_x.to(torch.float64) @ v_heads, eig_floor)
    return (inv_root, *torch.linalg.svd(root @ o_groups, full_matrices=False))


def ov_error_spectrum(w_v, w_o, num_heads: int, num_kv_heads: int, r_x=None, g_z=None,
                      eig_floor: float = DEFAULT_EIG_FLOOR) -> torch.Tensor:
    """Squared singular values the OV solver would discard, shape (heads or groups, head_dim), descending.

    Truncating to rank r leaves an output error energy of ``Σ_{i>=r} σ_i²`` per head (MHA, with
    ``g_z``) or per KV group (GQA, with ``r_x``): the analytical residual of :func:`solve_ov_mha` /
    :func:`solve_ov_gqa`.
    """
    if g_z is not None:
        return _ov_mha_core(w_o, g_z, num_heads, eig_floor)[2].pow(2)
    return _ov_gqa_core(w_v, w_o, r_x, num_heads, num_kv_heads, eig_floor)[2].pow(2)


def solve_ov_mha(w_v: torch.Tensor, w_o: torch.Tensor, g_z: torch.Tensor, num_heads: int, rank: int,
                 eig_floor: float = DEFAULT_EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """OV for MHA (§4a), per head with the attention-weighted statistics ``G_z,h`` of the o_proj input.

    ``SVD(G_z,h^{1/2} W_o,h) = P Σ Qᵀ``; ``W̃_v,h = W_v,h G_z,h^{-1/2} P_r``; ``W̃_o,h = Σ_r Q_rᵀ``.
    ``w_o`` is (H*hd, out); ``g_z`` is (H, hd, hd). Returns ``(w_v_new (in, H*r), w_o_new (H*r, out))``.
    """
    v_heads = _heads(w_v, num_heads)                                        # (H, in, hd)
    _check_rank(rank, v_heads.shape[-1], "head_dim_vo")
    inv_root, p, s, qh = _ov_mha_core(w_o, g_z, num_heads, eig_floor)
    v_new = v_heads @ (inv_root @ p[..., :rank])
    o_new = s[..., :rank, None] * qh[..., :rank, :]
    return _unheads(v_new), o_new.reshape(num_heads * rank, -1)


def solve_ov_gqa(w_v: torch.Tensor, w_o: torch.Tensor, r_x: torch.Tensor, num_heads: int,
                 num_kv_heads: int, rank: int, eig_floor: float = DEFAULT_EIG_FLOOR
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """OV for GQA (§4b), one joint SVD per KV group with the input autocorrelation ``R_x``.

    With ``G_v = W_v,gᵀ R_x W_v,g``: ``SVD(G_v^{1/2} [W_o,h1 … W_o,hg]) = P Σ Qᵀ``,
    ``W̃_v,g = W_v,g G_v^{-1/2} P_r Σ_r`` and ``W̃_o,hi = Q_rᵀ[:, block i]``.
    Returns ``(w_v_new (in, G*r), w_o_new (H*r, out))``.
    """
    v_heads = _heads(w_v, num_kv_heads)                                     # (G, in, hd)
    _check_rank(rank, v_heads.shape[-1], "head_dim_vo")
    group = num_heads // num_kv_heads
    d_out = w_o.shape[1]
    inv_root, p, s, qh = _ov_gqa_core(w_v, w_o, r_x, num_heads, num_kv_heads, eig_floor)
    v_new = v_heads @ (inv_root @ p[..., :rank] * s[..., None, :rank])
    o_new = qh[..., :rank, :].reshape(num_kv_heads, rank, group, d_out).permute(0, 2, 1, 3)
    return _unheads(v_new), o_new.reshape(num_heads * rank, d_out)


# -------------------------------------------------------------------------------------------- MLP
def mlp_channel_scores(w_down: torch.Tensor, down_input_sq_mean: torch.Tensor) -> torch.Tensor:
    """A3 score per intermediate channel: ``m_d[i]·||W_down[i, :]||²`` (``w_down`` is (inter, out))."""
    return down_input_sq_mean.to(torch.float64) * w_down.to(torch.float64).pow(2).sum(dim=1)


def select_mlp_channels(w_down: torch.Tensor, down_input_sq_mean: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Sorted indices of the ``intermediate_size`` best channels (§5, column selection, no rescaling)."""
    _check_rank(intermediate_size, w_down.shape[0], "intermediate_size")
    scores = mlp_channel_scores(w_down, down_input_sq_mean)
    return scores.topk(intermediate_size).indices.sort().values


def refit_down_proj(w_down: torch.Tensor, r_d: torch.Tensor, kept: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Least-squares refit of down_proj on the kept channels (§6, Nyström step).

    ``W̃ = (R_d[S,S] + δI)^{-1} (R_d[S,:] W_down + δ W_down[S])`` with ``δ = damping · mean(diag R_d[S,S])``:
    minimises ``E||x_d W_down - x_d[S] W̃||²`` over the calibration tokens, with a ridge towards the selected
    rows (so it never fits worse than the selection alone). Returns (len(S), out) in float64.
    """
    r, w = r_d.to(torch.float64), w_down.to(torch.float64)
    # refit_to_targets with X = x_d[S], T = x_d W_down: XᵀX = R_d[S,S], XᵀT = R_d[S,:] W_down.
    return refit_to_targets(r[kept][:, kept], r[kept] @ w, w[kept], damping)


# ------------------------------------------------------------------------------- teacher refit
def refit_to_targets(gram: torch.Tensor, cross: torch.Tensor, start: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Least-squares weights of a linear layer fed inputs ``X`` whose outputs should be targets ``T``,
    pulled towards the weights ``start`` it replaces (ridge around them, not around zero).

    Minimises ``||X W - T||² + δ ||W - start||²`` from ``gram = XᵀX`` (in, in) and ``cross = XᵀT``
    (in, out), with ``δ = damping · mean(diag gram)``: ``W = (XᵀX + δI)^{-1} (XᵀT + δ start)``. Damping
    towards ``start`` keeps a layer that already fits exactly (``XᵀT = XᵀX start``, e.g. at ratio 0)
    exactly as it was, and never raises the fit's error above ``start``'s. Float64; (in, out).
    """
    g = gram.to(torch.float64)
    delta = damping * g.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    start = start.to(torch.float64)
    return torch.linalg.solve(g + delta * eye, cross.to(torch.float64) + delta * start)


def fit_error(gram: torch.Tensor, cross: torch.Tensor, target_sq: float, weight: torch.Tensor) -> float:
    """``||X W - T||²`` from ``gram = XᵀX``, ``cross = XᵀT`` and ``target_sq = ||T||²`` (float64)."""
    w = weight.to(torch.float64)
    return float((w * (gram.to(torch.float64) @ w)).sum() - 2 * (w * cross.to(torch.float64)).sum() + target_sq)
