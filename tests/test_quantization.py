"""4-bit weight quantization of A3 models (hqq and optimum-quanto), saved and reloaded."""

import copy
import json

import pytest
import torch
import yaml
from torch import nn

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.math.budget import kv_cache_bytes_per_token
from optimum_a3.integrations.evaluation import perplexity
from optimum_a3.checkpoint.model_card import CARD_MARKER
from optimum_a3.integrations.quantization import (QuantizationError, inference_mode_as_no_grad, load_quantized, quantize_model,
                                     quantized_backend, save_quantized)
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(8, 32, seed=11)
PROBE = random_token_windows(2, 24, seed=12)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def a3_model():
    # hidden 64: every weight is a multiple of hqq's group of 64; o_proj/down_proj inputs (36, 72) are not,
    # as with A3's odd dims on real models (SmolLM2 at 20%: 459 and 1229).
    model = tiny_llama(hidden=64, intermediate=96, head_dim=12, num_heads=4, num_kv_heads=2)
    return A3Compressor(A3Config(ratio=0.25)).compress(model, calibration_ids=CALIB, progress=False)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_a3_model_reloads_with_identical_logits(tmp_path, a3_model, backend, dtype):
    quantized = quantize_model(copy.deepcopy(a3_model), backend=backend, bits=4, dtype=dtype)
    # Every reduced A3 projection is replaced by the library's layer; lm_head stays a float nn.Linear.
    layers = {name: type(m).__name__ for name, m in quantized.named_modules() if name.endswith(DECODER_LINEARS)}
    assert len(layers) == 7 * 2 and not any(kind == "Linear" for kind in layers.values()), layers
    assert type(quantized.lm_head) is nn.Linear
    assert quantized_backend(quantized) == backend
    expected = logits(quantized)
    assert expected.dtype == dtype
    # 4-bit is lossy but close: the error is real and bounded. On these random weights it is ~0.4 of the
    # logits' norm for both backends and dtypes; broken scales or a wrong layout give >= 1.
    reference = logits(a3_model)
    relative_error = ((expected.float() - reference).norm() / reference.norm()).item()
    assert 0 < relative_error < 0.6

    out = save_quantized(quantized, tmp_path / "q", tokenizer=tiny_tokenizer())
    record = json.loads((tmp_path / "q" / "config.json").read_text())["a3_quantization"]
    assert record["backend"] == backend and record["bits"] == 4 and record["dtype"] == str(dtype)[6:]
    reloaded = load_quantized(out)
    assert quantized_backend(reloaded) == backend
    assert torch.equal(logits(reloaded), expected)
    for original, layer in zip(a3_model.model.layers, reloaded.model.layers):
        assert torch.equal(layer.self_attn.rope_pairs, original.self_attn.rope_pairs)
        assert layer.self_attn.head_dim_qk == original.self_attn.head_dim_qk
    assert_card_describes_the_quantization(tmp_path / "q", backend, dtype, kv_cache_bytes_per_token(a3_model, dtype))


def assert_card_describes_the_quantization(directory, backend, dtype, kv_bytes):
    """The card of a quantized A3 checkpoint loads it with load_quantized, never with from_pretrained alone."""
    card = (directory / "README.md").read_text()
    # keys and values are cached in the compute dtype, not the dtype the model was compressed in (float32)
    assert f"| KV cache per token ({str(dtype)[6:]}) |" in card and f"| {kv_bytes:,} B" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    library = {"hqq": "hqq", "quanto": "optimum-quanto"}[backend]
    assert meta["library_name"] == "optimum-a3" and {library, "4-bit"} <= set(meta["tags"])
    assert "custom_code" not in meta["tags"]  # it does not load through transformers' remote code
    usage = card.split("## Usage")[1].split("## Compression")[0]
    assert 'load_quantized("path/to/this/checkpoint")' in usage and "AutoModelForCausalLM" not in usage
    section = card.split("## Quantization")[1].split("\n## ")[0]
    assert f"`{library}`" in section and "| Weight bits | 4 |" in section
    assert f"| Compute dtype (scales, activations, embeddings) | `{str(dtype)[6:]}` |" in section
    on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.name == "qmodel.pt" or p.suffix == ".safetensors")
    assert f"| Weight files on disk | {on_disk / 1e6:,.1f} MB |" in section
    assert "No perplexity was recorded after quantization." in section


def test_hqq_uses_group_size_64_by_default_and_quanto_its_own(a3_model):
    hqq = quantize_model(copy.deepcopy(a3_model), backend="hqq")
    assert hqq.config.a3_quantization["group_sizes"] == {"64": 14}
    quanto = quantize_model(copy.deepcopy(a3_model), backend="quanto")
    # quanto groups only input widths above 128 that a multiple of 32 divides: these are per channel.
    assert quanto.config.a3_quantization["group_sizes"] == {"per-channel": 14}


def test_hqq_packs_a3_widths_with_an_odd_number_of_groups(tmp_path):
    # One kv head of 9 value dims: v_proj is 9 x 64 = 576 weights, 9 groups of 64 (SmolLM2 at 20%: 1377).
    model = tiny_llama(hidden=64, intermediate=128, head_dim=16, num_heads=2, num_kv_heads=1)
    small = A3Compressor(A3Config(ratio=0.0, head_dim_vo=9)).compress(model, calibration_ids=CALIB, progress=False)
    with pytest.raises(QuantizationError, match="cannot pack 4-bit groups with axis=1"):
        quantize_model(copy.deepcopy(small), backend="hqq", axis=1)
    quantized = quantize_model(small, backend="hqq", dtype=torch.bfloat16)  # axis=0
    assert quantized.config.a3_quantization["axis"] == 0
    assert torch.equal(logits(load_quantized(save_quantized(quantized, tmp_path / "q"))), logits(quantized))


def test_skip_keeps_layers_in_float(a3_model):
    model = quantize_model(copy.deepcopy(a3_model), backend="quanto", skip=("lm_head", "mlp.down_proj"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is not nn.Linear


def test_bad_settings_are_refused_before_the_model_changes(a3_model):
    model = copy.deepcopy(a3_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match="backend must be one of"):
        quantize_model(model, backend="gptq")
    with pytest.raises(QuantizationError, match="supports bits in"):
        quantize_model(model, backend="quanto", bits=3)
    with pytest.raises(QuantizationError, match="picks the group size itself"):
        quantize_model(model, backend="quanto", group_size=64, dtype=torch.bfloat16)
    with pytest.raises(QuantizationError, match="axis must be 0 or 1"):
        quantize_model(model, backend="hqq", axis=2)
    with pytest.raises(QuantizationError, match="multiple of 8"):
        quantize_model(model, backend="hqq", group_size=12)
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize_model(model, backend="hqq", group_size=40, dtype=torch.bfloat16)
    with pytest.raises(QuantizationError, match="skips a layer kind"):
        quantize_model(model, backend="hqq", skip=("lm_head", "model.layers.0.mlp.down_proj"))
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_already_quantized_and_unquantized_models_are_refused(tmp_path, a3_model):
    quantized = quantize_model(copy.deepcopy(a3_model), backend="quanto")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(quantized, backend="hqq")
    with pytest.raises(QuantizationError, match="expects a model returned by quantize_model"):
        save_quantized(a3_model, tmp_path / "plain")
    A3Compressor(A3Config(ratio=0.25)).save(a3_model, tmp_path / "a3")
    with pytest.raises(QuantizationError, match="not a checkpoint written by save_quantized"):
        load_quantized(tmp_path / "a3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantizationError, match="no readable config.json"):
        load_quantized(tmp_path / "empty")
    with pytest.raises(QuantizationError, match="no such directory"):
        load_quantized(tmp_path / "missing")


def test_a_mistyped_relative_path_names_both_readings(monkeypatch, tmp_path):
    # "out/q4" is also a valid repo id: offline, the download fails, and the error says both things.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantizationError, match=r"no such directory: out/q4, and it could not be downloaded"):
        load_quantized("out/q4")


def test_card_of_a_sparse_quantization_record_states_only_what_is_recorded(a3_model):
    from optimum_a3.checkpoint.model_card import render_model_card

    config = a3_model.config.to_dict()
    config["a3_quantization"] = {"backend": "hqq", "evaluation": {"source": "wikitext2", "seqlen": 32, "ppl": 12.5}}
    card = render_model_card(config)
    assert "None" not in card and "low-bit" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["metrics"] == ["perplexity"] and "hqq" in meta["tags"]
    assert "| Left unquantized | embeddings and norms |" in card
    evaluation = card.split("## Evaluation")[1].split("\n## ")[0]
    assert "under [Quantization](#quantization)" in evaluation and "No evaluation was recorded" not in evaluation
    assert "**12.500**" in card.split("## Quantization")[1]


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_dense_bf16_model_reloads_with_identical_logits(tmp_path, backend):
    # A dense Llama keeps its rotary inv_freq in a non-persistent buffer: casting to bf16 must not round it,
    # or the reloaded model (which recomputes it in float32) would give other logits.
    model = tiny_llama(hidden=64, intermediate=128, head_dim=16)
    quantized = quantize_model(model, backend=backend, dtype=torch.bfloat16)
    assert quantized.model.rotary_emb.inv_freq.dtype == torch.float32
    reloaded = load_quantized(save_quantized(quantized, tmp_path / "q"))
    assert torch.equal(logits(reloaded), logits(quantized))
    card = tmp_path / "q" / "README.md"  # quanto writes huggingface_hub's generic mixin card; no A3 card
    assert not card.exists() or CARD_MARKER not in card.read_text()


def test_quanto_model_evaluates_with_the_perplexity_protocol(a3_model):
    # perplexity() runs under torch.inference_mode, where quanto's 4-bit layers fail on CPU.
    quantized = quantize_model(copy.deepcopy(a3_model), backend="quanto")
    ids = random_token_windows(1, 96, seed=5)[0]
    with inference_mode_as_no_grad(quantized):
        result = perplexity(quantized, ids, seqlen=32, progress=False)
    with torch.no_grad():
        loss = quantized(ids.view(3, 32), labels=ids.view(3, 32)).loss.item()
    assert result.num_windows == 3 and result.nll == pytest.approx(loss, rel=1e-5)
    assert torch.inference_mode is not torch.no_grad  # restored after the block
