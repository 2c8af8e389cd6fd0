"""Adapters are the only place that knows module paths: size counters, baselines, LoRA targets and the
compressor find layers and projections through them, on original, compressed and quantized models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_token_windows, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

from optimum_a3 import A3Compressor, A3Config, UnsupportedModelError
from optimum_a3.models import adapters
from optimum_a3.models.adapters import LlamaFamilyAdapter, adapter_for, decoder_layers
from optimum_a3.integrations.baselines import LowRankLinear, collect_input_gram, compress_plain_svd
from optimum_a3.math.budget import decoder_linear_params, kv_cache_bytes_per_token

CALIB = random_token_windows(4, 16, seed=3)


@pytest.fixture(scope="module")
def a3_model():
    return A3Compressor(A3Config(ratio=0.25)).compress(tiny_llama(), calibration_ids=CALIB, progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_decoder_layers_of_every_family(family):
    model = tiny_llama(family=family)
    adapter = adapter_for(model)
    assert decoder_layers(model) is model.model.layers is adapter.layers(model)
    assert adapter.decoder(model) is model.model
    assert adapter_for(model, validate=False) is adapter


def test_compressed_model_resolves_without_validation(a3_model):
    with pytest.raises(UnsupportedModelError, match="already A3-compressed"):
        adapter_for(a3_model)
    assert isinstance(adapter_for(a3_model, validate=False), LlamaFamilyAdapter)
    assert decoder_layers(a3_model) is a3_model.model.layers


def test_quantized_model_resolves(a3_model):
    import copy

    from optimum_a3.integrations.quantization import quantize_model

    pytest.importorskip("optimum.quanto")
    quantized = quantize_model(copy.deepcopy(a3_model), backend="quanto")
    assert decoder_layers(quantized) is quantized.model.layers
    assert kv_cache_bytes_per_token(quantized, torch.float32) == kv_cache_bytes_per_token(a3_model)


def test_lora_targets_name_every_projection(a3_model):
    assert adapter_for(a3_model, validate=False).lora_targets() == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_unknown_family_is_refused_by_the_counters():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    for count in (decoder_linear_params, kv_cache_bytes_per_token, decoder_layers):
        with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):
            count(model)


class MovedLayersAdapter(LlamaFamilyAdapter):
    """A family whose decoder lives at ``backbone.blocks``: only its adapter says so."""

    model_types = ("toy_moved",)
    decoder_path = "backbone"
    layers_path = "backbone.blocks"


def moved_llama():
    model = tiny_llama()
    model.backbone = model.model
    del model.model
    model.backbone.blocks = model.backbone.layers
    del model.backbone.layers
    model.config.model_type = "toy_moved"
    return model


def test_counters_and_baselines_follow_the_adapter(monkeypatch):
    monkeypatch.setattr(adapters, "ADAPTERS", [*adapters.ADAPTERS, MovedLayersAdapter()])
    reference, moved = tiny_llama(), moved_llama()
    assert decoder_layers(moved) is moved.backbone.blocks
    assert decoder_linear_params(moved) == decoder_linear_params(reference)
    assert kv_cache_bytes_per_token(moved) == kv_cache_bytes_per_token(reference)

    svd_moved = compress_plain_svd(moved, 0.25, progress=False)
    svd_reference = compress_plain_svd(reference, 0.25, progress=False)
    for got, want in zip(svd_moved.backbone.blocks, svd_reference.model.layers):
        assert isinstance(got.self_attn.q_proj, LowRankLinear)
        for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
            assert torch.equal(a, b), name
    assert decoder_linear_params(svd_moved) == decoder_linear_params(svd_reference)


def test_shared_input_groups_share_one_gram():
    model = tiny_llama()
    grams = collect_input_gram(model, CALIB, progress=False)
    for idx in range(model.config.num_hidden_layers):
        assert grams[idx, "self_attn.q_proj"] is grams[idx, "self_attn.k_proj"] is grams[idx, "self_attn.v_proj"]
        assert grams[idx, "mlp.gate_proj"] is grams[idx, "mlp.up_proj"]
        assert grams[idx, "self_attn.o_proj"] is not grams[idx, "self_attn.q_proj"]
        assert grams[idx, "mlp.down_proj"] is not grams[idx, "mlp.gate_proj"]
