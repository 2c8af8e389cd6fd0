"""Model families as adapters over one pipeline: Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm), MHA-Llama."""

import pytest
import torch

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.models.adapters import UnsupportedModelError
from optimum_a3.config import A3ConfigError

from reload_helpers import reload_in_fresh_process, save_reference
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

FAMILIES = {
    "qwen2": dict(family="qwen2", tie=False),
    "qwen3": dict(family="qwen3", tie=False),
    "mha-llama": dict(family="llama", num_kv_heads=4),
}


def _compress(model, **kwargs):
    config = A3Config(nsamples=8, seqlen=32, method="paper", **kwargs)
    ids = random_token_windows(8, 32, seed=1)
    return A3Compressor(config).compress(model, calibration_ids=ids, progress=False)


@pytest.mark.filterwarnings("ignore:qk left uncompressed")
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_reproduces_logits(family):
    model = tiny_llama(**FAMILIES[family])
    compressed = _compress(model, ratio=0.0)
    ids = random_token_windows(2, 24, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(compressed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_qwen2_biases_are_carried():
    model = tiny_llama(family="qwen2", tie=False)
    compressed = _compress(model, ratio=0.25)
    c = model.config
    h, g, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    half, group = hd // 2, h // g
    for idx, layer in enumerate(compressed.model.layers):
        attn, original = layer.self_attn, model.model.layers[idx].self_attn
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
        # q/k: the bias entries of the kept dims, per KV group (its query heads share its pairs).
        for kv in range(g):
            kept = attn.rope_pairs[kv]
            dims = torch.cat([kept, kept + half])
            torch.testing.assert_close(attn.k_proj.bias.view(g, -1)[kv], original.k_proj.bias.view(g, hd)[kv, dims])
            for head in range(kv * group, (kv + 1) * group):
                torch.testing.assert_close(attn.q_proj.bias.view(h, -1)[head], original.q_proj.bias.view(h, hd)[head, dims])
        # v: every attention row sums to one, so the value bias of query head h's KV group adds the constant
        # b_v,g(h) W_o,h to the output: folded exactly into the o_proj bias (Qwen2 has none), v bias zero.
        assert original.o_proj.bias is None
        assert torch.count_nonzero(attn.v_proj.bias) == 0
        w_o, b_v = original.o_proj.weight.double(), original.v_proj.bias.double()
        expected = torch.zeros(c.hidden_size, dtype=torch.float64)
        for head in range(h):
            kv = head // group
            expected += w_o[:, head * hd:(head + 1) * hd] @ b_v[kv * hd:(kv + 1) * hd]
        torch.testing.assert_close(attn.o_proj.bias.double(), expected, rtol=1e-5, atol=1e-6)


def test_qwen2_bias_aware_pair_scores_use_the_input_mean():
    """With a large key bias on one pair, the bias-aware score must keep that pair."""
    model = tiny_llama(family="qwen2", tie=False)
    hd = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.view(-1, hd)[:, [3, 3 + hd // 2]] = 50.0
            layer.self_attn.q_proj.bias.view(-1, hd)[:, [3, 3 + hd // 2]] = 50.0
    compressed = _compress(model, ratio=0.5)
    for layer in compressed.model.layers:
        assert (layer.self_attn.rope_pairs == 3).any(dim=-1).all()


def test_qwen3_keeps_qk_and_compresses_ov_and_mlp():
    model = tiny_llama(family="qwen3", tie=False)
    with pytest.warns(UserWarning, match="qk left uncompressed"):
        compressed = _compress(model, ratio=0.25)
    c = compressed.config
    assert c.qk_norm and c.head_dim_qk == model.config.head_dim
    assert c.head_dim_vo == 12 and c.intermediate_size == 72
    assert compressed.config.a3_compression["components"] == ["ov", "mlp"]
    torch.testing.assert_close(compressed.model.layers[1].self_attn.q_norm.weight,
                               model.model.layers[1].self_attn.q_norm.weight)


def test_qwen3_explicit_qk_dim_is_refused():
    with pytest.raises(A3ConfigError, match="qk cannot be compressed"):
        _compress(tiny_llama(family="qwen3", tie=False), ratio=0.25, head_dim_qk=8)


def test_mixed_sliding_and_full_layers_are_refused():
    model = tiny_llama(family="qwen2", tie=False, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="per-layer attention types"):
        _compress(model, ratio=0.25)


@pytest.mark.filterwarnings("ignore:qk left uncompressed")
@pytest.mark.parametrize("family", FAMILIES)
def test_quarter_ratio_round_trips_without_optimum_a3(tmp_path, family):
    model, tok = tiny_llama(**FAMILIES[family]), tiny_tokenizer()
    compressed = _compress(model, ratio=0.25)
    out = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.25)).save(compressed, out, tokenizer=tok)
    reference = tmp_path / "reference.pt"
    save_reference(compressed, random_token_windows(2, 20, seed=9), reference)
    reload_in_fresh_process(str(out), reference, cwd=tmp_path)
