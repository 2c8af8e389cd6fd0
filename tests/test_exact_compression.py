"""Compressions whose answer is known exactly, end to end (issue 19: the suite's blind spots).

* Ratio 0 on models whose settings differ from the compressed config's defaults (``rms_norm_eps``,
  ``rope_theta``, Llama-3 ``rope_type: llama3`` scaling, layer-norm weights that are not 1.0): a
  compressed config or checkpoint that loses one of them changes the logits.
* Ratio > 0 on models built so that A3 must be exact: q/k weights that are zero on the rotary pairs to be
  dropped (only the ORIGINAL softmax scale ``1/sqrt(head_dim)`` then reproduces the scores), o_proj blocks
  of rank <= head_dim_vo per KV group (the OV solver must be exact), MLP channels that contribute nothing
  (the A3 channel score is exactly 0 on them). These run the solvers, the selection scores and the
  compressed modeling code together, which ratio 0 never does (identity selection, no OV solve).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_a3 import A3Compressor, A3Config
from tiny_models import random_token_windows, tiny_llama

CALIB = random_token_windows(6, 32, seed=21)
PROBE = random_token_windows(2, 24, seed=22)
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 forward; every lost setting/solver bug below is >= 1e-2

# Settings that differ from the A3 config's defaults (rms_norm_eps 1e-6, rope_theta 1e4, no scaling).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 20000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # all three llama3 bands at hd 16
NON_DEFAULT = {
    "eps-theta": dict(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    "llama3-rope": dict(rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE)),
    "qwen2": dict(family="qwen2", tie=False, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}
# Families of the exact constructions (non-default settings throughout, so RoPE gathering is checked
# under llama3 scaling too).
EXACT = {
    "gqa": dict(rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE)),
    "mha": dict(num_kv_heads=4, rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE)),
    "qwen2": NON_DEFAULT["qwen2"],
}


def compress(model, **kwargs):
    return A3Compressor(A3Config(**kwargs)).compress(model, calibration_ids=CALIB, progress=False)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def reload(compressed, directory):
    A3Compressor(A3Config(ratio=0.0)).save(compressed, directory)
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


# ------------------------------------------------------------------------ config and RoPE settings
@pytest.mark.parametrize("variant", NON_DEFAULT)
def test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload(tmp_path, variant):
    model = tiny_llama(random_norms=True, **NON_DEFAULT[variant])
    assert model.config.rms_norm_eps == 1e-5 and model.model.norm.weight.std() > 0.1
    reference = logits(model)
    # Honesty: each setting matters on this model, far beyond TOL (the same weights, one setting lost).
    theta = model.config.rope_parameters["rope_theta"]
    for lost in ({"rms_norm_eps": 1e-6}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
                 {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}):
        if lost.get("rope_parameters") == model.config.rope_parameters:
            continue  # no scaling to lose in this variant
        fallback = tiny_llama(random_norms=True, **{**NON_DEFAULT[variant], **lost})
        assert (logits(fallback) - reference).abs().max() > 1e-3, lost

    small = compress(model, ratio=0.0)
    c = small.config
    assert c.rms_norm_eps == 1e-5 and c.rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(logits(small), reference, **TOL)

    reloaded = reload(small, tmp_path / f"ckpt-{variant}")
    assert reloaded.config.rms_norm_eps == 1e-5 and reloaded.config.rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(logits(reloaded), reference, **TOL)


# ------------------------------------------------------------------------ exact constructions
def _dropped_pairs(layer: int, group: int, half: int) -> tuple[int, int]:
    """The two rotary pairs that layer ``layer``, KV group ``group`` must drop (differ per group/layer)."""
    first = (layer + 3 * group) % half
    return first, (first + 5) % half


def zero_rope_pairs(model) -> dict[int, list[list[int]]]:
    """Make two rotary pairs per KV group contribute nothing to the scores; returns the pairs A3 must keep.

    Pair ``a``: q and k weights (and biases) zero on dims a and a + head_dim/2 in every head of the group.
    Pair ``b``: only q is zero, k is scaled up, so that only the A3 score ``E[q²]·E[k²]`` (a product, not
    a sum, with q summed over the group's heads) is certain to be 0 there.
    """
    c = model.config
    hd, h, g = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    half, group = hd // 2, h // g
    kept = {}
    with torch.no_grad():
        for idx, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            q_w, k_w = attn.q_proj.weight.view(h, hd, -1), attn.k_proj.weight.view(g, hd, -1)
            q_b = None if attn.q_proj.bias is None else attn.q_proj.bias.view(h, hd)
            k_b = None if attn.k_proj.bias is None else attn.k_proj.bias.view(g, hd)
            kept[idx] = []
            for kv in range(g):
                a, b = _dropped_pairs(idx, kv, half)
                heads = slice(kv * group, (kv + 1) * group)
                for pair in (a, b):
                    q_w[heads, [pair, pair + half]] = 0.0
                    if q_b is not None:
                        q_b[heads, [pair, pair + half]] = 0.0
                k_w[kv, [a, a + half]] = 0.0
                k_w[kv, [b, b + half]] *= 4.0
                if k_b is not None:
                    k_b[kv, [a, a + half]] = 0.0
                kept[idx].append(sorted(set(range(half)) - {a, b}))
    return kept


def low_rank_ov(model, rank: int, seed: int = 0) -> None:
    """Per KV group, make the o_proj blocks of its query heads, side by side ``[W_o,h1 … W_o,hg]``
    (head_dim x group*hidden), of rank ``rank``: the OV solver (GQA joint SVD, MHA per head) is then exact."""
    c = model.config
    hd, h, g, d = c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    group = h // g
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w_o = layer.self_attn.o_proj.weight                       # (d, h*hd): W_o,h = w_o[:, h*hd:(h+1)*hd].T
            for kv in range(g):
                left = torch.randn(hd, rank, generator=gen, dtype=torch.float64)
                right = torch.randn(rank, group * d, generator=gen, dtype=torch.float64)
                blocks = (left @ right * (0.15 / rank**0.5)).to(w_o.dtype)
                for i in range(group):
                    head = kv * group + i
                    w_o[:, head * hd:(head + 1) * hd] = blocks[:, i * d:(i + 1) * d].T


def dead_mlp_channels(model, count: int, seed: int = 0) -> dict[int, list[int]]:
    """Per layer, ``count`` intermediate channels that contribute nothing; returns the channels to keep.

    Half have a zero down_proj column but a strong activation (gate/up rows scaled up); half have a zero
    activation (gate and up rows zero) but a strong down_proj column. Their A3 score
    ``m_d[i]·||W_down[i,:]||²`` is exactly 0, while a score missing either factor keeps some of them.
    """
    inter = model.config.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    with torch.no_grad():
        for idx, layer in enumerate(model.model.layers):
            mlp = layer.mlp
            dead = torch.randperm(inter, generator=gen)[:count]
            silent_down, silent_act = dead[: count // 2], dead[count // 2:]
            mlp.down_proj.weight[:, silent_down] = 0.0
            mlp.gate_proj.weight[silent_down] *= 2.0
            mlp.up_proj.weight[silent_down] *= 2.0
            mlp.gate_proj.weight[silent_act] = 0.0
            mlp.up_proj.weight[silent_act] = 0.0
            mlp.down_proj.weight[:, silent_act] *= 3.0
            kept[idx] = sorted(set(range(inter)) - set(dead.tolist()))
    return kept


def exact_model(family: str, **kwargs):
    """A model A3 at ratio 0.25 (head_dim_qk 12, head_dim_vo 12, intermediate 72) must reproduce exactly,
    with the pairs and channels it must keep."""
    model = tiny_llama(random_norms=True, **EXACT[family], **kwargs)
    kept_pairs = zero_rope_pairs(model)
    low_rank_ov(model, rank=12)
    kept_channels = dead_mlp_channels(model, count=24)
    return model, kept_pairs, kept_channels


def _check_selection(small, kept_pairs, kept_channels, components):
    for idx, layer in enumerate(small.model.layers):
        if "qk" in components:
            assert layer.self_attn.rope_pairs.tolist() == kept_pairs[idx], f"layer {idx}: wrong rotary pairs kept"
        if "mlp" in components:
            assert layer.mlp.up_proj.out_features == len(kept_channels[idx])


@pytest.mark.parametrize("head_dim_vo", [16, 12], ids=["vo16", "vo12"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", EXACT)
def test_softmax_scale_stays_the_original_one_when_qk_shrinks(family, attn, head_dim_vo):
    """The zeroed pairs add nothing to q·k, so dropping them (explicit head_dim_qk) is exact, but only
    with the softmax scale 1/sqrt(original head_dim), not 1/sqrt(head_dim_qk). With head_dim_vo 12 too
    (exact on the low-rank o_proj), SDPA's q/k/v are padded to width 12 only, so SDPA's default scale
    1/sqrt(width) is wrong as well; with head_dim_vo 16 they are padded to 16."""
    model = tiny_llama(random_norms=True, attn_implementation=attn, **EXACT[family])
    kept_pairs = zero_rope_pairs(model)
    low_rank_ov(model, rank=12)
    reference = logits(model)
    small = compress(model, head_dim_qk=12, head_dim_vo=head_dim_vo, components=["qk", "ov"])
    assert (small.config.head_dim_qk, small.config.head_dim_vo, small.config.head_dim) == (12, head_dim_vo, 16)
    assert small.model.layers[0].self_attn.scaling == pytest.approx(16 ** -0.5)
    _check_selection(small, kept_pairs, None, ["qk"])
    torch.testing.assert_close(logits(small), reference, **TOL)
    # Honesty: 1/sqrt(head_dim_qk) would be off by far more than the tolerance.
    for layer in small.model.layers:
        layer.self_attn.scaling = 12 ** -0.5
    assert (logits(small) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("components", [["qk"], ["ov"], ["mlp"], ["qk", "ov", "mlp"]], ids="-".join)
@pytest.mark.parametrize("family", EXACT)
def test_known_low_rank_model_is_reproduced_at_ratio_quarter(family, components):
    model, kept_pairs, kept_channels = exact_model(family)
    reference = logits(model)
    small = compress(model, ratio=0.25, components=components, allocation="uniform")
    expected = {"qk": 12, "ov": 12, "mlp": 72}
    c = small.config
    assert (c.head_dim_qk, c.head_dim_vo, c.intermediate_size) == tuple(
        expected[k] if k in components else full for k, full in (("qk", 16), ("ov", 16), ("mlp", 96)))
    _check_selection(small, kept_pairs, kept_channels, components)
    if "mlp" in components:
        original = model.model.layers[0].mlp
        torch.testing.assert_close(small.model.layers[0].mlp.down_proj.weight,
                                   original.down_proj.weight[:, kept_channels[0]], rtol=0, atol=0)
    torch.testing.assert_close(logits(small), reference, **TOL)


@pytest.mark.parametrize("family", EXACT)
def test_known_low_rank_model_is_reproduced_with_the_paper_method_and_after_reload(tmp_path, family):
    model, kept_pairs, kept_channels = exact_model(family)
    reference = logits(model)
    small = compress(model, ratio=0.25, method="paper")
    _check_selection(small, kept_pairs, kept_channels, ["qk", "mlp"])
    torch.testing.assert_close(logits(small), reference, **TOL)
    torch.testing.assert_close(logits(reload(small, tmp_path / f"exact-{family}")), reference, **TOL)


def test_one_dim_less_than_the_exact_rank_is_visibly_inexact():
    """Honesty check of the tolerance: one rotary pair, one OV rank or one live channel fewer than the
    construction allows changes the logits by far more than TOL."""
    model, _, _ = exact_model("gqa")
    reference = logits(model)
    for dims in (dict(head_dim_qk=10, head_dim_vo=12, intermediate_size=72),
                 dict(head_dim_qk=12, head_dim_vo=11, intermediate_size=72),
                 dict(head_dim_qk=12, head_dim_vo=12, intermediate_size=71)):
        small = compress(model, **dims)
        assert (logits(small) - reference).abs().max() > 1e-2, dims
