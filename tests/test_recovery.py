"""Recovery fine-tune of A3 models (LoRA or the weights, next-token loss or distillation): lower training
loss, unchanged architecture, reproducible."""

import copy

import pytest
import torch

from optimum_a3 import A3Compressor, A3Config, A3LlamaForCausalLM
from optimum_a3.calibration.windows import calibration_windows
from optimum_a3.integrations.quantization import quantize_model
from optimum_a3.integrations.recovery import (RecoveryError, _distillation_loss, _training_windows, lm_loss, recover,
                                              recover_with_lora)
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(8, 32, seed=11)
TEXT = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(120)]
RUN = {"dataset": TEXT, "steps": 12, "seqlen": 48, "learning_rate": 1e-2, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dense():
    return tiny_llama()


@pytest.fixture(scope="module")
def a3_model(dense):
    # Uniform dims: the settings below (learning rates, the 0.8 KL bound) were chosen for this start.
    return A3Compressor(A3Config(ratio=0.25, allocation="uniform")).compress(dense, calibration_ids=CALIB,
                                                                            progress=False)


@pytest.fixture(scope="module")
def recovered(a3_model, tokenizer):
    return recover_with_lora(a3_model, tokenizer, **RUN)


def test_training_loss_drops_and_architecture_is_unchanged(a3_model, recovered, tokenizer):
    windows = calibration_windows(tokenizer, TEXT, RUN["steps"], RUN["seqlen"], RUN["seed"])  # the training windows
    assert lm_loss(recovered, windows) < lm_loss(a3_model, windows) - 0.1
    assert type(recovered) is A3LlamaForCausalLM
    before, after = a3_model.state_dict(), recovered.state_dict()
    assert before.keys() == after.keys()  # merged: no lora_A/lora_B left
    assert all(after[k].shape == v.shape and after[k].dtype == v.dtype for k, v in before.items())
    for name in ("head_dim_qk", "head_dim_vo", "intermediate_size"):
        assert getattr(recovered.config, name) == getattr(a3_model.config, name)
    for old, new in zip(a3_model.model.layers, recovered.model.layers):
        assert torch.equal(new.self_attn.rope_pairs, old.self_attn.rope_pairs)
        assert not torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight)  # the adapters were merged
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert recovered.lm_head.weight.data_ptr() == recovered.model.embed_tokens.weight.data_ptr()  # still tied
    record = recovered.config.a3_compression["recovery"]
    assert record["rank"] == 8 and record["steps"] == 12 and record["loss_last_steps"] < record["loss_first_steps"]
    assert "recovery" not in a3_model.config.a3_compression  # the input model is left as it was


def test_same_seed_same_weights_other_seed_other_weights(a3_model, recovered, tokenizer):
    again = recover_with_lora(a3_model, tokenizer, **RUN).state_dict()
    assert all(torch.equal(again[k], v) for k, v in recovered.state_dict().items())
    other = recover_with_lora(a3_model, tokenizer, **{**RUN, "seed": 1}).state_dict()
    assert any(not torch.equal(other[k], v) for k, v in recovered.state_dict().items())


def test_recovered_model_saves_and_reloads(tmp_path, recovered):
    A3Compressor(A3Config(ratio=0.25)).save(recovered, tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    ids = CALIB[:2, :16]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, recovered(ids).logits)
    assert reloaded.config.a3_compression["recovery"]["rank"] == 8


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
def test_recovered_model_quantizes_saves_and_reloads_like_any_a3_model(tmp_path, recovered, backend):
    """README: fine-tune first, quantize after; the merged model quantizes like any A3 model."""
    from optimum_a3.integrations.quantization import load_quantized, quantized_backend, save_quantized

    ids = CALIB[:2, :16]
    with torch.no_grad():
        reference = recovered(ids).logits
    quantized = quantize_model(copy.deepcopy(recovered), backend=backend, bits=4)
    layers = [m for name, m in quantized.named_modules() if name.endswith(("_proj",))]
    assert len(layers) == 7 * len(recovered.model.layers) and not any(type(m) is torch.nn.Linear for m in layers)
    with torch.no_grad():
        expected = quantized(ids).logits
    error = ((expected - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.6  # lossy but close (as in test_quantization): the recovered weights were quantized
    save_quantized(quantized, tmp_path / "q", tokenizer=tiny_tokenizer())
    reloaded = load_quantized(tmp_path / "q")
    assert quantized_backend(reloaded) == backend
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    for old, new in zip(recovered.model.layers, reloaded.model.layers):
        assert torch.equal(new.self_attn.rope_pairs, old.self_attn.rope_pairs)
    assert reloaded.config.a3_compression["recovery"] == recovered.config.a3_compression["recovery"]


def test_train_ids_replace_text(a3_model):
    ids = random_token_windows(5, 16, seed=3)
    model = recover_with_lora(a3_model, train_ids=ids, steps=5, seqlen=16, rank=2, progress=False)
    assert model.config.a3_compression["recovery"]["dataset"] == "user-provided token ids"


def test_training_visits_the_text_windows_in_a_seeded_random_order(tokenizer):
    # The text's windows come in text order; training in that order ends the schedule on a few articles.
    in_text_order = calibration_windows(tokenizer, TEXT, 12, 48, 0)
    windows, _ = _training_windows(tokenizer, TEXT, None, 12, 48, 0)
    assert sorted(map(tuple, windows.tolist())) == sorted(map(tuple, in_text_order.tolist()))
    assert not torch.equal(windows, in_text_order)
    assert torch.equal(windows, _training_windows(tokenizer, TEXT, None, 12, 48, 0)[0])
    assert not torch.equal(windows, _training_windows(tokenizer, TEXT, None, 12, 48, 1)[0])


def test_bad_inputs_give_clear_errors(a3_model, tokenizer):
    with pytest.raises(RecoveryError, match="expects an A3 model"):
        recover_with_lora(tiny_llama(), tokenizer, **RUN)
    with pytest.raises(RecoveryError, match="is quantized"):
        recover_with_lora(quantize_model(copy.deepcopy(a3_model), backend="quanto"), tokenizer, **RUN)
    with pytest.raises(RecoveryError, match="too little training text for 500 windows of 48 tokens"):
        recover_with_lora(a3_model, tokenizer, **{**RUN, "steps": 500})
    with pytest.raises(RecoveryError, match="train_ids has 3 windows"):
        recover_with_lora(a3_model, train_ids=random_token_windows(3, 16), steps=5, seqlen=16, progress=False)
    with pytest.raises(RecoveryError, match="shape"):
        recover_with_lora(a3_model, train_ids=random_token_windows(8, 16), steps=5, seqlen=32, progress=False)
    with pytest.raises(RecoveryError, match="tokenizer is needed"):
        recover_with_lora(a3_model, dataset=TEXT, steps=2, progress=False)
    for bad in ({"steps": 0}, {"rank": 0}, {"seqlen": 1}, {"learning_rate": 0.0}, {"learning_rate": float("nan")},
                {"warmup_steps": 12}, {"batch_size": 1.5}):
        with pytest.raises(RecoveryError):
            recover_with_lora(a3_model, tokenizer, **{**RUN, **bad})
    with pytest.raises(RecoveryError, match="loss became"):
        recover_with_lora(a3_model, tokenizer, **{**RUN, "learning_rate": 1e30})


def mean_kl(teacher, student, windows) -> float:
    """Mean KL(teacher || student) of the next-token distributions over every position of ``windows``."""
    with torch.no_grad():
        return _distillation_loss(student(windows).logits, teacher(windows).logits, 1.0).item()


def test_distillation_loss_is_the_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    for temperature in (1.0, 2.5):
        p = torch.softmax(teacher / temperature, -1)
        expected = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean() * temperature ** 2
        assert _distillation_loss(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-6)
    assert _distillation_loss(teacher, teacher, 1.0).abs().item() < 1e-6


@pytest.mark.parametrize("method", ["lora", "weights"])
def test_distillation_brings_the_model_closer_to_the_dense_teacher(dense, a3_model, tokenizer, method):
    run = {**RUN, "learning_rate": 1e-2 if method == "lora" else 3e-3}
    distilled = recover(a3_model, tokenizer, method=method, teacher=dense, **run)
    windows = calibration_windows(tokenizer, TEXT, RUN["steps"], RUN["seqlen"], RUN["seed"])  # the training windows
    before, after = mean_kl(dense, a3_model, windows), mean_kl(dense, distilled, windows)
    assert after < 0.8 * before
    record = distilled.config.a3_compression["recovery"]
    assert record["method"] == method and record["objective"] == "distillation" and record["temperature"] == 1.0
    assert record["teacher"] == dense.config._name_or_path or record["teacher"] == type(dense).__name__
    assert ("rank" in record) == (method == "lora")
    assert type(distilled) is A3LlamaForCausalLM
    assert [p.requires_grad for p in distilled.parameters()] == [p.requires_grad for p in a3_model.parameters()]


def test_weight_fine_tune_trains_only_the_projections(a3_model, tokenizer):
    tuned = recover(a3_model, tokenizer, method="weights", **{**RUN, "learning_rate": 3e-3})
    windows = calibration_windows(tokenizer, TEXT, RUN["steps"], RUN["seqlen"], RUN["seed"])
    assert lm_loss(tuned, windows) < lm_loss(a3_model, windows) - 0.1
    before, after = a3_model.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    projections = {f"{name}.weight" for name, m in a3_model.named_modules() if name.endswith("_proj")}
    for name, value in before.items():
        assert after[name].shape == value.shape and after[name].dtype == value.dtype
        assert torch.equal(after[name], value) == (name not in projections), name  # the rest is frozen
    assert tuned.config.a3_compression["recovery"]["objective"] == "next-token"
    assert "recovery" not in a3_model.config.a3_compression
    again = recover(a3_model, tokenizer, method="weights", **{**RUN, "learning_rate": 3e-3}).state_dict()
    assert all(torch.equal(again[k], v) for k, v in after.items())


def test_bad_recovery_method_or_teacher_gives_clear_errors(a3_model, tokenizer):
    with pytest.raises(RecoveryError, match="method must be one of 'lora', 'weights', got 'full'"):
        recover(a3_model, tokenizer, method="full", **RUN)
    with pytest.raises(RecoveryError, match="teacher's vocabulary \\(64\\) is not the model's \\(128\\)"):
        recover(a3_model, tokenizer, teacher=tiny_llama(vocab=64), **RUN)
    with pytest.raises(RecoveryError, match="the teacher is the model being fine-tuned"):
        recover(a3_model, tokenizer, teacher=a3_model, **RUN)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(RecoveryError, match="temperature must be a positive number"):
            recover(a3_model, tokenizer, teacher=tiny_llama(), temperature=bad, **RUN)
    with pytest.raises(RecoveryError, match="no linear layer is named like"):
        recover(a3_model, tokenizer, method="weights", target_modules=["nope"], **RUN)
