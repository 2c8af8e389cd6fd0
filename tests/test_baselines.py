"""Plain SVD and SVD-LLM baselines: factor algebra, optimality, whole-model compression."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tiny_models import random_token_windows, tiny_llama

from optimum_a3.integrations.baselines import (
    LowRankLinear,
    collect_input_gram,
    compress_plain_svd,
    compress_svd_llm,
    plain_svd_factors,
    svd_llm_factors,
    svd_rank,
)
from optimum_a3.math.budget import decoder_linear_params

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def anisotropic_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows with a geometric spectrum in a random basis: whitening matters for them."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return torch.randn(tokens, dim, generator=g, dtype=torch.float64) * scales @ basis.T


def random_weight(out_features: int, in_features: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g, dtype=torch.float64)


def output_error(w: torch.Tensor, w_approx: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm((w - w_approx) @ x.T).item()


def test_svd_rank():
    assert svd_rank(48, 96, 0.2) == 25  # floor(0.8 * 48 * 96 / 144) = floor(25.6)
    assert svd_rank(64, 64, 0.5) == 16
    assert svd_rank(4, 4, 0.99) == 1
    with pytest.raises(ValueError):
        svd_rank(4, 4, 1.0)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_factors_reproduce_weight(shape):
    w = random_weight(*shape)
    x = anisotropic_inputs(200, shape[1])
    full = min(shape)
    a, b = plain_svd_factors(w, full)
    assert a.shape == (full, shape[1]) and b.shape == (shape[0], full)
    assert a.dtype == b.dtype == torch.float64
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-10)
    a, b = svd_llm_factors(w, x.T @ x, full)
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-10)


def test_svd_llm_is_output_optimal():
    w = random_weight(24, 40)
    x = anisotropic_inputs(300, 40)
    xtx = x.T @ x
    rank = 8
    a_plain, b_plain = plain_svd_factors(w, rank)
    a_llm, b_llm = svd_llm_factors(w, xtx, rank)
    plain_err = output_error(w, b_plain @ a_plain, x)
    llm_err = output_error(w, b_llm @ a_llm, x)
    # Theory: the error is carried by the discarded singular values of W S, X^T X = S S^T.
    sigma = torch.linalg.svdvals(w @ torch.linalg.cholesky(xtx))
    optimum = sigma[rank:].square().sum().sqrt().item()
    assert llm_err == pytest.approx(optimum, rel=1e-8)
    assert llm_err < 0.5 * plain_err  # strongly anisotropic inputs: whitening helps a lot
    # Plain SVD is the optimum of the weight error instead.
    assert torch.linalg.matrix_norm(w - b_plain @ a_plain).item() <= torch.linalg.matrix_norm(w - b_llm @ a_llm).item()


def test_svd_llm_singular_gram_gets_shifted():
    w = random_weight(24, 40)
    x = anisotropic_inputs(300, 40)
    x[:, 5] = 0.0  # one dead input channel: X^T X is singular and the Cholesky factorisation fails
    a, b = svd_llm_factors(w, x.T @ x, 8)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    a_plain, b_plain = plain_svd_factors(w, 8)
    assert output_error(w, b @ a, x) <= output_error(w, b_plain @ a_plain, x)


def test_low_rank_linear_from_factors_keeps_bias_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10, bias=True).to(torch.bfloat16)
    a, b = plain_svd_factors(linear.weight, 10)
    low = LowRankLinear.from_factors(linear, a, b)
    assert low.first.weight.dtype == low.second.weight.dtype == torch.bfloat16
    assert low.first.bias is None
    assert torch.equal(low.second.bias, linear.bias)
    assert low.first.weight.shape == (10, 12) and low.second.weight.shape == (10, 10)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    torch.testing.assert_close(low(x).float(), linear(x).float(), rtol=0.05, atol=0.05)


def lowrank_tiny_llama(true_rank: int = 8, noise: float = 1e-4):
    """tiny_llama whose decoder linears have rank ``true_rank`` (plus tiny noise), so rank ≥ 15 is near exact."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    out_f, in_f = module.weight.shape
                    left = torch.randn(out_f, true_rank, generator=g) / true_rank ** 0.5
                    right = torch.randn(true_rank, in_f, generator=g) * 0.15 / true_rank ** 0.5
                    module.weight.copy_(left @ right + noise * torch.randn(out_f, in_f, generator=g))
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    for layer in model.model.layers:
        assert not any(isinstance(m, LowRankLinear) for m in layer.modules())
        assert not any(m._forward_pre_hooks for m in layer.modules())


def compress(method: str, model, ratio: float, calibration: torch.Tensor):
    if method == "plain":
        return compress_plain_svd(model, ratio, progress=False)
    return compress_svd_llm(model, ratio, calibration, batch_size=2, progress=False)


@pytest.mark.parametrize("method", ["plain", "svd_llm"])
def test_compress_model(method):
    model = tiny_llama()
    calibration = random_token_windows(4, 32)
    before = snapshot(model)
    dense_params = decoder_linear_params(model)
    assert dense_params == sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)

    ratio = 0.3
    compressed = compress(method, model, ratio, calibration)
    assert_unchanged(model, before)
    for layer in compressed.model.layers:
        for name in PROJECTIONS:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            low = getattr(parent, name)
            assert isinstance(low, LowRankLinear)
            assert low.rank == svd_rank(low.in_features, low.out_features, ratio)
    removed = 1 - decoder_linear_params(compressed) / dense_params
    assert removed == pytest.approx(ratio, abs=0.03)  # floor() on tiny dims costs a little extra

    with torch.no_grad():
        logits = compressed(input_ids=calibration[:2], use_cache=False).logits
    assert logits.shape == (2, 32, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["plain", "svd_llm"])
def test_ratio_zero_is_untouched_copy(method):
    model = tiny_llama()
    copy = compress(method, model, 0.0, random_token_windows(2, 16))
    assert copy is not model
    assert_unchanged(copy, snapshot(model))


@pytest.mark.parametrize("method", ["plain", "svd_llm"])
def test_high_rank_keeps_logits(method):
    model = lowrank_tiny_llama()
    calibration = random_token_windows(4, 32)
    compressed = compress(method, model, 0.2, calibration)  # every rank >= 15 > true rank 8
    ids = random_token_windows(2, 32, seed=5)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = compressed(input_ids=ids, use_cache=False).logits
    assert (out - ref).abs().max().item() < 1e-2 * ref.abs().max().item()


def test_svd_llm_beats_plain_on_calibration_outputs():
    """Layer 0's inputs are the same in every model, so each factorised q_proj can be checked on them."""
    model = tiny_llama()
    calibration = random_token_windows(4, 32)
    grams = collect_input_gram(model, calibration, progress=False)
    captured = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    handle.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1]).double()
    torch.testing.assert_close(grams[(0, "self_attn.q_proj")], x.T @ x, rtol=1e-10, atol=1e-8)
    assert grams[(0, "self_attn.k_proj")] is grams[(0, "self_attn.q_proj")]  # shared input, shared statistics

    plain = compress_plain_svd(model, 0.4, progress=False)
    svd_llm = compress_svd_llm(model, 0.4, calibration, progress=False)
    with torch.no_grad():
        ref = model.model.layers[0].self_attn.q_proj(captured[0])
        err_plain = (plain.model.layers[0].self_attn.q_proj(captured[0]) - ref).norm()
        err_llm = (svd_llm.model.layers[0].self_attn.q_proj(captured[0]) - ref).norm()
    assert err_llm < err_plain
