"""End to end on tiny random Llama-family models: compress, count, save, reload anywhere."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from optimum_a3 import (A3Compressor, A3Config, A3ConfigError, A3LlamaForCausalLM, CalibrationDataError,
                        NonFiniteStatisticsError, OutputDirError, UnsupportedModelError)
from optimum_a3.math.budget import decoder_linear_params, kv_cache_bytes_per_token, uniform_dims
from optimum_a3.checkpoint.shards import ShardWriter
from reload_helpers import reload_in_fresh_process, save_reference
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(6, 32, seed=11)
PROBE = random_token_windows(2, 24, seed=12)
REFIT_CALIB = random_token_windows(12, 32, seed=13)  # 384 tokens: 4 per MLP channel, the refit's minimum


def compress(model, **kwargs):
    return A3Compressor(A3Config(**kwargs)).compress(model, calibration_ids=CALIB, progress=False)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ratio_zero_reproduces_logits(kv_heads, attn):
    model = tiny_llama(num_kv_heads=kv_heads, attn_implementation=attn)
    small = compress(model, ratio=0.0)
    assert isinstance(small, A3LlamaForCausalLM)
    torch.testing.assert_close(logits(small), logits(model), rtol=1e-5, atol=1e-5)


def test_output_hidden_states_match_transformers_llama_at_ratio_zero():
    """``output_hidden_states=True`` works as in transformers (embeddings, every layer, the final norm's output);
    without it there are none; attention weights are refused, not silently left out."""
    model = tiny_llama()
    small = compress(model, ratio=0.0)
    with torch.no_grad():
        ours = small(PROBE, output_hidden_states=True).hidden_states
        theirs = model(PROBE, output_hidden_states=True).hidden_states
        assert small(PROBE).hidden_states is None
    assert len(ours) == len(theirs) == model.config.num_hidden_layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output_attentions"):
        small(PROBE, output_attentions=True)


def test_ratio_zero_reproduces_mistral_with_sliding_window():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=8,
                           max_position_embeddings=128)
    model = MistralForCausalLM(config).eval()
    small = compress(model, ratio=0.0)
    assert small.config.sliding_window == 8
    torch.testing.assert_close(logits(small), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_ratio_quarter_sizes_match_budget(kv_heads):
    model = tiny_llama(num_kv_heads=kv_heads)
    small = compress(model, ratio=0.25, allocation="uniform")
    c = model.config
    dims = uniform_dims(0.25, c.head_dim, c.intermediate_size)
    assert (small.config.head_dim_qk, small.config.head_dim_vo, small.config.intermediate_size) == (
        dims.head_dim_qk, dims.head_dim_vo, dims.intermediate_size) == (12, 12, 72)
    d, h, g = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    per_layer = d * (h + g) * dims.head_dim_qk + d * g * dims.head_dim_vo + h * dims.head_dim_vo * d \
        + 3 * d * dims.intermediate_size
    assert decoder_linear_params(small) == c.num_hidden_layers * per_layer
    assert decoder_linear_params(small) == pytest.approx(0.75 * decoder_linear_params(model), rel=1e-9)
    assert kv_cache_bytes_per_token(small) == pytest.approx(0.75 * kv_cache_bytes_per_token(model), rel=1e-9)
    assert small.model.embed_tokens.weight.data_ptr() == small.lm_head.weight.data_ptr()  # still tied
    assert small.model.layers[0].self_attn.rope_pairs.shape == (g, dims.head_dim_qk // 2)


def test_compression_does_not_modify_the_input_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress(model, ratio=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_same_seed_gives_identical_weights_from_text():
    model, tok = tiny_llama(), tiny_tokenizer()
    text = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(60)]
    cfg = A3Config(ratio=0.25, dataset=text, nsamples=4, seqlen=64, seed=3)
    a = A3Compressor(cfg).compress(model, tok, progress=False).state_dict()
    b = A3Compressor(cfg).compress(model, tok, progress=False).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = A3Compressor(A3Config(ratio=0.25, dataset=text, nsamples=4, seqlen=64, seed=4)).compress(model, tok, progress=False)
    assert any(not torch.equal(a[k], v) for k, v in c.state_dict().items())  # the seed matters


def test_mixed_per_layer_dims_and_components():
    model = tiny_llama(layers=3)
    small = compress(model, head_dim_qk=[16, 8, 4], head_dim_vo=[5, 16, 9], intermediate_size=[96, 40, 7])
    for i, (qk, vo, inter) in enumerate([(16, 5, 96), (8, 16, 40), (4, 9, 7)]):
        layer = small.model.layers[i]
        assert layer.self_attn.q_proj.out_features == 4 * qk and layer.self_attn.v_proj.out_features == 2 * vo
        assert layer.mlp.up_proj.out_features == inter
    only_mlp = compress(model, ratio=0.5, components=["mlp"], allocation="uniform")
    assert only_mlp.config.head_dim_qk == 16 and only_mlp.config.intermediate_size == 48
    out = logits(small)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_save_and_reload_in_process_without_optimum_a3(tmp_path, kv_heads):
    model, tok = tiny_llama(num_kv_heads=kv_heads), tiny_tokenizer()
    compressor = A3Compressor(A3Config(ratio=0.25))
    small = compressor.compress(model, calibration_ids=CALIB, progress=False)
    out = tmp_path / "ckpt"
    compressor.save(small, out, tokenizer=tok)
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "modeling_a3_llama.py", "configuration_a3_llama.py",
            "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_a3_llama.A3LlamaForCausalLM"
    assert config["a3_compression"]["ratio"] == 0.25 and config["a3_compression"]["calibration"]["tokens"] == CALIB.numel()
    ref = tmp_path / "ref.pt"
    save_reference(small, PROBE, ref)
    reload_in_fresh_process(out, ref, cwd=tmp_path)


def test_cached_generation_equals_uncached_in_memory():
    small = compress(tiny_llama(), ratio=0.25)
    prompt = PROBE[:2, :5]
    cached = small.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = small.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------- bad input
def test_unsupported_architecture_names_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported: llama, mistral"):
        compress(model, ratio=0.2)


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
    ({}, "give a ratio"),
    ({"ratio": 0.2, "head_dim_qk": 0}, ">= 1"),
    ({"ratio": 0.2, "components": ["qk", "attn"]}, "components"),
    ({"ratio": 0.2, "nsamples": 0}, "nsamples"),
    ({"ratio": 0.2, "hold_mlp_intermediate": "no"}, "hold_mlp_intermediate must be True or False"),
])
def test_invalid_config_is_refused(kwargs, match):
    with pytest.raises(A3ConfigError, match=match):
        A3Config(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"head_dim_qk": 7, "head_dim_vo": 8, "intermediate_size": 8}, "must be even"),
    ({"head_dim_qk": 18, "head_dim_vo": 8, "intermediate_size": 8}, r"head_dim_qk=18 .* \[1, 16\]"),
    ({"head_dim_qk": 8, "head_dim_vo": 17, "intermediate_size": 8}, r"head_dim_vo=17"),
    ({"head_dim_qk": 8, "head_dim_vo": 8, "intermediate_size": 97}, r"intermediate_size=97"),
    ({"head_dim_qk": [8, 8, 8], "head_dim_vo": 8, "intermediate_size": 8}, "3 entries but the model has 2 layers"),
])
def test_dims_that_do_not_fit_the_model_are_refused(kwargs, match):
    with pytest.raises(A3ConfigError, match=match):
        compress(tiny_llama(), **kwargs)


def test_too_little_calibration_text_is_refused():
    cfg = A3Config(ratio=0.2, dataset=["tiny text"] * 3, nsamples=4, seqlen=64)
    with pytest.raises(CalibrationDataError, match="fewer than nsamples x seqlen = 4 x 64"):
        A3Compressor(cfg).compress(tiny_llama(), tiny_tokenizer(), progress=False)


def test_non_finite_statistics_are_refused():
    model = tiny_llama()
    with torch.no_grad():  # finite weights (non-finite ones are refused by name first) whose product overflows
        model.model.layers[1].mlp.up_proj.weight[0, :] = 3e38
    with pytest.raises(NonFiniteStatisticsError, match="layer 1"):
        compress(model, ratio=0.2)


def test_non_empty_output_dir_is_refused_and_failed_save_leaves_nothing(tmp_path, monkeypatch):
    compressor = A3Compressor(A3Config(ratio=0.25))
    small = compressor.compress(tiny_llama(), calibration_ids=CALIB, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(OutputDirError, match="not empty"):
        compressor.save(small, busy)
    assert os.listdir(busy) == ["keep.txt"]

    def broken_finish(self, **kwargs):
        Path(self.directory, "model.safetensors").write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "finish", broken_finish)
    with pytest.raises(OSError, match="disk full"):
        compressor.save(small, tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        compressor.save(small, busy, overwrite=True)
    assert not (tmp_path / "fresh").exists()
    assert os.listdir(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # no temporary directories left behind


def test_overwrite_replaces_existing_checkpoint(tmp_path):
    compressor = A3Compressor(A3Config(ratio=0.25))
    small = compressor.compress(tiny_llama(), calibration_ids=CALIB, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    compressor.save(small, out, overwrite=True)
    assert "old.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_compressor_dict_round_trip():
    cfg = A3Config(ratio=0.3, components=["qk", "mlp"], head_dim_vo=[4, 8], nsamples=7, seqlen=33, seed=5,
                   dataset=["a", "b"], mlp_refit=True)
    comp = A3Compressor(cfg)
    again = A3Compressor.from_dict(json.loads(json.dumps(comp.to_dict())))
    assert again.config == cfg
    with pytest.raises(A3ConfigError, match="unknown"):
        A3Config.from_dict({"ratio": 0.2, "bits": 4})
    # A record from before max_dim_factor existed describes an unbounded allocation, not today's default.
    assert A3Config.from_dict({"ratio": 0.2, "allocation": "mixed"}).max_dim_factor is None
    assert A3Config(ratio=0.2, allocation="mixed").max_dim_factor == 1.5


def test_reused_statistics_give_identical_checkpoint_weights():
    model = tiny_llama()
    first = A3Compressor(A3Config(ratio=0.25, sequential=False, allocation="uniform"))
    a = first.compress(model, calibration_ids=CALIB, progress=False, keep_statistics=True)
    assert len(first.last_statistics) == 2
    again = A3Compressor(A3Config(ratio=0.25, sequential=False, allocation="uniform")).compress(model, statistics=first.last_statistics, progress=False)
    sa, sb = a.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The statistics carry the description of their calibration data into the new record ...
    assert again.config.a3_compression["calibration"] == first.last_calibration
    assert first.last_calibration["dataset"] == "user-provided token ids"
    # ... which a plain list of statistics does not have.
    plain = A3Compressor(A3Config(ratio=0.25, sequential=False, allocation="uniform")).compress(model, statistics=list(first.last_statistics),
                                                                           progress=False)
    assert plain.config.a3_compression["calibration"] == {"dataset": "reused statistics", "seed": 0}


def _dropout_does_not_change_the_result(method):
    """At a ratio where the statistics shape the weights, a model in training mode with attention dropout
    must compress to the same weights as the same model without dropout: the calibration forward runs in
    eval mode (and the model's mode is restored)."""
    results = []
    for dropout in (0.0, 0.5):
        model = tiny_llama(attention_dropout=dropout).train()
        small = compress(model, ratio=0.25, method=method)
        assert model.training and not small.training
        results.append(small)
    without, with_dropout = (m.state_dict() for m in results)
    assert without.keys() == with_dropout.keys()
    differ = [k for k in without if not torch.equal(without[k], with_dropout[k])]
    assert not differ, f"attention dropout changed the compressed weights: {differ[:4]}"
    torch.testing.assert_close(logits(results[1]), logits(results[0]), rtol=0, atol=0)


def test_training_mode_is_restored_and_dropout_not_used():
    _dropout_does_not_change_the_result("paper")


def test_sequential_calibration_runs_the_compressed_layers_without_dropout():
    _dropout_does_not_change_the_result("default")


def test_sdpa_matches_eager_when_qk_and_vo_dims_differ():
    model = tiny_llama()
    small = compress(model, head_dim_qk=10, head_dim_vo=7, intermediate_size=50)
    small.config._attn_implementation = "sdpa"
    sdpa = logits(small)
    small.config._attn_implementation = "eager"
    torch.testing.assert_close(sdpa, logits(small), rtol=1e-5, atol=1e-5)
    wider_vo = compress(model, head_dim_qk=6, head_dim_vo=12, intermediate_size=50)
    wider_vo.config._attn_implementation = "sdpa"
    sdpa = logits(wider_vo)
    wider_vo.config._attn_implementation = "eager"
    torch.testing.assert_close(sdpa, logits(wider_vo), rtol=1e-5, atol=1e-5)


def test_fast_paths_of_the_modeling_code_match_the_plain_formulas():
    from optimum_a3.models.a3_llama import modeling_a3_llama as modeling

    small = compress(tiny_llama(), head_dim_qk=10, head_dim_vo=7, intermediate_size=50)
    # MLP: widths that are not a multiple of 8 are computed as weight @ x.T on CPU (faster with MKL).
    mlp = small.model.layers[0].mlp
    x = torch.randn(2, 16, small.config.hidden_size, generator=torch.Generator().manual_seed(3))
    assert modeling._token_major(32, mlp.gate_proj.out_features)
    with torch.no_grad():
        reference = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), reference, rtol=1e-5, atol=1e-6)
    # RoPE: written straight into the zero-padded buffer without autograd; the same values with it.
    q = torch.randn(2, 3, 2, 5, 10, generator=torch.Generator().manual_seed(4))
    angles = torch.rand(2, 3, 1, 5, 5, generator=torch.Generator().manual_seed(5)) * 6
    cos, sin = angles.cos(), angles.sin()
    reference = q * torch.cat((cos, cos), -1) + torch.cat((-q[..., 5:], q[..., :5]), -1) * torch.cat((sin, sin), -1)
    with torch.no_grad():
        fast = modeling.apply_kept_rotary(q, cos, sin, 12)
    with_grad = modeling.apply_kept_rotary(q.clone().requires_grad_(), cos, sin, 12)
    torch.testing.assert_close(fast[..., :10], reference)
    assert torch.equal(fast[..., 10:], torch.zeros_like(fast[..., 10:]))
    torch.testing.assert_close(with_grad.detach(), fast)
    assert modeling.common_head_dim(10, 7) == 12 and modeling.common_head_dim(52, 51) == 52


def test_mlp_refit_lowers_mlp_output_error_on_calibration_data():
    model = tiny_llama()
    plain, refit = (A3Compressor(A3Config(components=["mlp"], intermediate_size=40, **kw)).compress(
        model, calibration_ids=REFIT_CALIB, progress=False)
        for kw in ({"method": "paper"}, {"mlp_refit": True, "sequential": False}))
    assert refit.config.a3_compression["mlp_refit"] is True
    ref = logits(model, REFIT_CALIB)
    err = lambda m: (logits(m, REFIT_CALIB) - ref).pow(2).mean().item()  # noqa: E731
    assert err(refit) < err(plain)


@pytest.mark.parametrize("windows, asked, used", [(200, None, 4), (48, None, 2), (12, None, 1), (48, 4, 4)])
def test_the_methods_refit_stride_is_lowered_to_sample_enough_tokens(windows, asked, used):
    """The default's refit_stride 4 gives way where R_d would sample < 8 tokens per MLP channel (intermediate
    96 here: 6,400 / 1,536 / 384 calibration tokens); a stride asked for is kept (4 per channel suffice)."""
    kw = {} if asked is None else {"refit_stride": asked}
    compressor = A3Compressor(A3Config(ratio=0.3, sensitivity_tokens=16, **kw))
    calibration = random_token_windows(windows, 32, seed=1)
    record = compressor.compress(tiny_llama(), calibration_ids=calibration, progress=False).config.a3_compression
    assert record["mlp_refit"] is True
    assert compressor.last_effective_config.refit_stride == record["a3_config"]["refit_stride"] == used


def test_refit_is_skipped_loudly_when_calibration_is_too_small():
    model = tiny_llama()  # intermediate 96: needs >= 384 tokens
    few = random_token_windows(2, 32, seed=3)
    compressor = A3Compressor(A3Config(ratio=0.25, mlp_refit=True, sequential=False, allocation="uniform"))
    with pytest.warns(UserWarning, match="mlp_refit skipped: 64 calibration tokens"):
        small = compressor.compress(model, calibration_ids=few, progress=False)
    assert small.config.a3_compression["mlp_refit"] is False
    plain = A3Compressor(A3Config(method="paper", ratio=0.25)).compress(model, calibration_ids=few, progress=False)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in small.state_dict().items())
    enough = A3Compressor(A3Config(ratio=0.25, mlp_refit=True, sequential=False, allocation="uniform"))
    refit = enough.compress(model, calibration_ids=REFIT_CALIB, progress=False)
    assert refit.config.a3_compression["mlp_refit"] is True
