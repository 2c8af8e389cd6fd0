"""The A3 solvers reach their objectives (method page §3-§6) on random PSD statistics, in float64."""

import pytest
import torch

from optimum_a3.math import solvers
from optimum_a3.math.linalg import add_gram_upper_, mirror_gram_upper_, psd_roots

D, HD = 24, 8


@pytest.fixture(autouse=True)
def float64_by_default():
    # Set per test and restored: a module-level set_default_dtype would leak into every later test file.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_psd(n, seed, decay=0.85):
    """An anisotropic PSD matrix (eigenvalues decaying geometrically), like real activations."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * decay ** torch.arange(n, dtype=torch.float64)) @ q.T


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def heads(w, n):
    return w.reshape(w.shape[0], n, -1).permute(1, 0, 2)


# ------------------------------------------------------------------------------------ helpers
def qk_error(wq, wk, wq2, wk2, r, h, g):
    """Σ_h ||R^{1/2} (W_q,h W_k,gᵀ - W̃_q,h W̃_k,gᵀ) R^{1/2}||² (score error over tokens)."""
    root, _ = psd_roots(r)
    qh, kh, qh2, kh2 = heads(wq, h), heads(wk, g), heads(wq2, h), heads(wk2, g)
    rep = h // g
    return sum(((root @ (qh[i] @ kh[i // rep].T - qh2[i] @ kh2[i // rep].T) @ root) ** 2).sum() for i in range(h))


def ov_error(wv, wo, wv2, wo2, r, h, g):
    """Σ_h ||R^{1/2} (W_v,g W_o,h - W̃_v,g W̃_o,h)||² (GQA objective with the input autocorrelation)."""
    root, _ = psd_roots(r)
    vh, vh2 = heads(wv, g), heads(wv2, g)
    oh, oh2 = wo.reshape(h, -1, wo.shape[1]), wo2.reshape(h, -1, wo2.shape[1])
    rep = h // g
    return sum(((root @ (vh[i // rep] @ oh[i] - vh2[i // rep] @ oh2[i])) ** 2).sum() for i in range(h))


# --------------------------------------------------------------------------------------- RoPE QK
@pytest.mark.parametrize("h,g", [(4, 2), (4, 4)])
def test_rope_selection_full_size_is_identity(h, g):
    wq, wk, r = randn(D, h * HD, seed=1), randn(D, g * HD, seed=2), random_psd(D, 3)
    keep = solvers.select_rope_pairs(wq, wk, r, h, g, HD)
    assert torch.equal(keep, torch.arange(HD // 2).repeat(g, 1))
    dims = solvers.rope_kept_dims(keep, HD)
    assert torch.equal(solvers.gather_head_columns(wq, h, dims), wq)
    assert torch.equal(solvers.gather_head_columns(wk, g, dims), wk)


def test_rope_selection_keeps_best_pairs_per_group():
    h, g, r_qk = 4, 2, 4
    wq, wk, r = randn(D, h * HD, seed=4), randn(D, g * HD, seed=5), random_psd(D, 6)
    keep = solvers.select_rope_pairs(wq, wk, r, h, g, r_qk)
    scores = solvers.rope_pair_scores(wq, wk, r, h, g)
    # the scores are E[q_j²]·E[k_j²] computed directly from the definition
    rq = heads(wq, h)
    e_q = torch.stack([sum(torch.diag(rq[i].T @ r @ rq[i]) for i in range(2 * grp, 2 * grp + 2)) for grp in range(g)])
    e_k = torch.stack([torch.diag(heads(wk, g)[grp].T @ r @ heads(wk, g)[grp]) for grp in range(g)])
    lam = e_q * e_k
    assert torch.allclose(scores, lam[:, : HD // 2] + lam[:, HD // 2:])
    gen = torch.Generator().manual_seed(0)
    for grp in range(g):
        kept_score = scores[grp, keep[grp]].sum()
        for _ in range(50):
            other = torch.randperm(HD // 2, generator=gen)[: r_qk // 2]
            assert kept_score >= scores[grp, other].sum() - 1e-12
    # whole pairs, half-split layout: dims p and p + HD/2 of each kept pair
    dims = solvers.rope_kept_dims(keep, HD)
    assert torch.equal(dims[:, r_qk // 2:], dims[:, : r_qk // 2] + HD // 2)


def test_rope_selection_rejects_odd_and_oversized_dims():
    wq, wk, r = randn(D, 4 * HD, seed=1), randn(D, 2 * HD, seed=2), random_psd(D, 3)
    with pytest.raises(ValueError, match="even"):
        solvers.select_rope_pairs(wq, wk, r, 4, 2, 3)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        solvers.select_rope_pairs(wq, wk, r, 4, 2, 10)


# --------------------------------------------------------------------------------------- NoPE QK
@pytest.mark.parametrize("h,g", [(4, 2), (4, 4)])
def test_qk_svd_full_rank_reproduces_scores(h, g):
    wq, wk, r = randn(D, h * HD, seed=7), randn(D, g * HD, seed=8), random_psd(D, 9)
    wq2, wk2 = solvers.solve_qk_svd(wq, wk, r, h, g, HD)
    assert qk_error(wq, wk, wq2, wk2, r, h, g) < 1e-18 * qk_error(wq, wk, 0 * wq, 0 * wk, r, h, g) + 1e-20


@pytest.mark.parametrize("h,g", [(4, 2), (4, 4)])
def test_qk_svd_reduced_rank_is_optimal(h, g):
    rank = 3
    wq, wk, r = randn(D, h * HD, seed=10), randn(D, g * HD, seed=11), random_psd(D, 12, decay=0.7)
    wq2, wk2 = solvers.solve_qk_svd(wq, wk, r, h, g, rank)
    err = qk_error(wq, wk, wq2, wk2, r, h, g)
    # Eckart-Young optimum of the stacked weighted product, computed the expensive way (d_model-sized)
    root, _ = psd_roots(r)
    rep = h // g
    optimum = 0.0
    for grp in range(g):
        stacked = torch.cat([root @ heads(wq, h)[i] @ heads(wk, g)[grp].T @ root for i in range(grp * rep, (grp + 1) * rep)])
        optimum += (torch.linalg.svdvals(stacked)[rank:] ** 2).sum()
    assert err == pytest.approx(optimum.item(), rel=1e-9)
    # plain (unweighted) SVD of each group's product at the same rank is worse
    plain_q, plain_k = [], []
    for grp in range(g):
        stacked = torch.cat([heads(wq, h)[i] @ heads(wk, g)[grp].T for i in range(grp * rep, (grp + 1) * rep)])
        u, s, vt = torch.linalg.svd(stacked)
        plain_q.append((u[:, :rank] * s[:rank]).reshape(rep, D, rank))
        plain_k.append(vt[:rank].T)
    pq = torch.cat(plain_q).permute(1, 0, 2).reshape(D, h * rank)
    pk = torch.stack(plain_k).permute(1, 0, 2).reshape(D, g * rank)
    assert err <= qk_error(wq, wk, pq, pk, r, h, g)
    # random rank-r choices are worse too
    for seed in range(20):
        assert err <= qk_error(wq, wk, randn(D, h * rank, seed=100 + seed), randn(D, g * rank, seed=200 + seed), r, h, g)


# --------------------------------------------------------------------------------------------- OV
def test_ov_gqa_full_rank_reproduces_and_reduced_is_optimal():
    h, g, rank = 6, 2, 3
    wv, wo, r = randn(D, g * HD, seed=13), randn(h * HD, D, seed=14), random_psd(D, 15, decay=0.7)
    v_full, o_full = solvers.solve_ov_gqa(wv, wo, r, h, g, HD)
    assert ov_error(wv, wo, v_full, o_full, r, h, g) < 1e-20 * ov_error(wv, wo, 0 * wv, 0 * wo, r, h, g) + 1e-20
    v2, o2 = solvers.solve_ov_gqa(wv, wo, r, h, g, rank)
    err = ov_error(wv, wo, v2, o2, r, h, g)
    root, _ = psd_roots(r)
    rep = h // g
    optimum = sum((torch.linalg.svdvals(torch.cat([root @ heads(wv, g)[grp] @ wo.reshape(h, HD, D)[i]
                                                   for i in range(grp * rep, (grp + 1) * rep)], dim=1))[rank:] ** 2).sum()
                  for grp in range(g))
    assert err == pytest.approx(optimum.item(), rel=1e-9)
    # plain SVD (no input statistics) and random choices are worse
    pv, po = solvers.solve_ov_gqa(wv, wo, torch.eye(D), h, g, rank)
    assert err <= ov_error(wv, wo, pv, po, r, h, g)
    for seed in range(20):
        assert err <= ov_error(wv, wo, randn(D, g * rank, seed=300 + seed), randn(h * rank, D, seed=400 + seed), r, h, g)


def mha_error(wv, wo, wv2, wo2, gz, h):
    """Σ_h ||G_z,h^{1/2} (W_o,h - M_h W̃_o,h)||² where z̃_h = z_h M_h is what the compressed v produces."""
    total = 0.0
    vh, vh2 = heads(wv, h), heads(wv2, h)
    oh, oh2 = wo.reshape(h, HD, -1), wo2.reshape(h, wv2.shape[1] // h, -1)
    for i in range(h):
        m = torch.linalg.lstsq(vh[i], vh2[i]).solution            # W̃_v,h = W_v,h M (exact for our solver)
        root, _ = psd_roots(gz[i])
        total += ((root @ (oh[i] - m @ oh2[i])) ** 2).sum()
    return total


def test_ov_mha_full_rank_reproduces_and_reduced_is_optimal():
    h, rank = 3, 3
    wv, wo = randn(D, h * HD, seed=16), randn(h * HD, D, seed=17)
    gz = torch.stack([random_psd(HD, 18 + i, decay=0.6) for i in range(h)])
    v_full, o_full = solvers.solve_ov_mha(wv, wo, gz, h, HD)
    for i in range(h):
        assert torch.allclose(heads(v_full, h)[i] @ o_full.reshape(h, HD, D)[i], heads(wv, h)[i] @ wo.reshape(h, HD, D)[i], atol=1e-9)
    v2, o2 = solvers.solve_ov_mha(wv, wo, gz, h, rank)
    err = mha_error(wv, wo, v2, o2, gz, h)
    optimum = sum((torch.linalg.svdvals(psd_roots(gz[i])[0] @ wo.reshape(h, HD, D)[i])[rank:] ** 2).sum() for i in range(h))
    assert err == pytest.approx(optimum.item(), rel=1e-8)
    pv, po = solvers.solve_ov_mha(wv, wo, torch.eye(HD).expand(h, HD, HD), h, rank)   # unweighted SVD
    assert err <= mha_error(wv, wo, pv, po, gz, h)
    for seed in range(10):
        m = randn(h, HD, rank, seed=500 + seed)
        rv = (heads(wv, h) @ m).permute(1, 0, 2).reshape(D, h * rank)
        assert err <= mha_error(wv, wo, rv, randn(h * rank, D, seed=600 + seed), gz, h)


# -------------------------------------------------------------------------------------------- MLP
def mlp_output_error(xd, w_down, kept, new_down):
    return ((xd @ w_down - xd[:, kept] @ new_down) ** 2).sum()


def test_mlp_selection_full_and_best_score():
    inter = 32
    w_down, m_d = randn(inter, D, seed=19), randn(inter, seed=20).abs()
    assert torch.equal(solvers.select_mlp_channels(w_down, m_d, inter), torch.arange(inter))
    kept = solvers.select_mlp_channels(w_down, m_d, 12)
    scores = solvers.mlp_channel_scores(w_down, m_d)
    assert torch.allclose(scores, m_d * (w_down ** 2).sum(1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert scores[kept].sum() >= scores[torch.randperm(inter, generator=gen)[:12]].sum()


def test_mlp_refit_never_increases_calibration_error():
    inter, tokens = 32, 400
    mixing = randn(inter, inter, seed=21) * 0.3 + torch.eye(inter)
    xd = randn(tokens, inter, seed=22) @ mixing                      # correlated channels
    w_down = randn(inter, D, seed=23)
    m_d = (xd ** 2).mean(0)
    r_d = xd.T @ xd / tokens
    for k in (4, 12, 24, 32):
        kept = solvers.select_mlp_channels(w_down, m_d, k)
        plain = mlp_output_error(xd, w_down, kept, w_down[kept])
        refit = mlp_output_error(xd, w_down, kept, solvers.refit_down_proj(w_down, r_d, kept, damping=1e-10))
        # damping perturbs the exact solution by ~damping relative to the output energy
        assert refit <= plain * (1 + 1e-9) + 1e-9 * (xd @ w_down).pow(2).sum()
        if k < inter:
            assert refit < plain


def test_psd_roots_are_inverse_and_floor_clamps():
    r = random_psd(10, 30)
    root, inv_root = psd_roots(r)
    assert torch.allclose(root @ root, r, atol=1e-12)
    assert torch.allclose(root @ inv_root, torch.eye(10), atol=1e-9)
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0
    root, inv_root = psd_roots(singular, eig_floor=1e-6)
    assert torch.isfinite(inv_root).all()


@pytest.mark.parametrize("width", [5, 300, 1031], ids=["small", "blocked", "blocked-uneven"])
def test_blocked_gram_accumulation_equals_the_full_product(width):
    g = torch.Generator().manual_seed(width)
    batches = [torch.randn(n, width, generator=g, dtype=torch.float64) for n in (7, 64, 33)]
    acc = torch.zeros(width, width, dtype=torch.float64)
    for x in batches:
        add_gram_upper_(acc, x)
    full = torch.cat(batches).T @ torch.cat(batches)
    torch.testing.assert_close(mirror_gram_upper_(acc), full, rtol=1e-12, atol=1e-10)
