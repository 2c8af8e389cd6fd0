"""The teacher refit (``teacher_refit=True``, ``method="quality"``): o_proj and down_proj refit by least squares
so that each compressed layer, fed the compressed model's own inputs, gives the ORIGINAL model's outputs."""

import pytest
import torch

from optimum_a3 import A3Compressor, A3Config, A3ConfigError
from optimum_a3.math.budget import decoder_linear_params
from optimum_a3.math.solvers import fit_error, refit_to_targets
from optimum_a3.pipeline import loop
from reload_helpers import reload_in_fresh_process, save_reference
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(8, 32, seed=21)
PROBE = random_token_windows(2, 24, seed=22)


def compress(model, **kwargs):
    return A3Compressor(A3Config(**kwargs)).compress(model, calibration_ids=CALIB, progress=False)


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------ the solve
def _problem(n_in=12, n_out=5, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    t = torch.randn(tokens, n_out, generator=g, dtype=torch.float64)
    return x, t, torch.randn(n_in, n_out, generator=g, dtype=torch.float64)


def test_refit_keeps_weights_that_already_fit_exactly():
    x, _, start = _problem()
    t = x @ start
    for damping in (0.0, 1e-4, 1.0):
        torch.testing.assert_close(refit_to_targets(x.T @ x, x.T @ t, start, damping), start, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("damping", [0.0, 1e-4, 1e-1, 10.0])
def test_refit_never_raises_the_fit_error_of_its_start(seed, damping):
    x, t, start = _problem(seed=seed)
    new = refit_to_targets(x.T @ x, x.T @ t, start, damping)
    err = lambda w: fit_error(x.T @ x, x.T @ t, t.pow(2).sum().item(), w)  # noqa: E731
    torch.testing.assert_close(err(start), (x @ start - t).pow(2).sum().item())  # fit_error is that error
    assert err(new) <= err(start) + 1e-9
    if damping == 0.0:  # the plain least-squares solution
        torch.testing.assert_close(new, torch.linalg.lstsq(x, t).solution)
        assert err(new) < 0.9 * err(start)


# ------------------------------------------------------------------------------------ in the pipeline
@pytest.mark.parametrize("shape", [dict(), dict(num_kv_heads=4), dict(family="qwen2")], ids=["gqa", "mha", "qwen2"])
def test_ratio_zero_reproduces_logits(shape):
    model = tiny_llama(layers=3, **shape)
    small = compress(model, ratio=0.0, method="quality")
    assert small.config.a3_compression["a3_config"]["teacher_refit"] is True
    torch.testing.assert_close(logits(small), logits(model), rtol=1e-5, atol=1e-5)


def _recording(monkeypatch):
    """Record every refit the loop makes: (layer-relative weight name, start entries, statistics, result)."""
    calls = []
    original = loop.refit_to_teacher

    def record(adapter, entries, name, fit, config):
        out = original(adapter, entries, name, fit, config)
        key = f"{adapter.linear_paths[name]}.weight"
        calls.append((name, entries[key].double().T, fit, out[key].double().T))
        return out

    monkeypatch.setattr(loop, "refit_to_teacher", record)
    return calls


@pytest.mark.parametrize("shape", [dict(), dict(num_kv_heads=4), dict(family="qwen2")], ids=["gqa", "mha", "qwen2"])
def test_each_refit_lowers_its_own_objective_from_the_closed_form(monkeypatch, shape):
    model = tiny_llama(layers=3, **shape)
    calls = _recording(monkeypatch)
    small = compress(model, ratio=0.4, method="quality")
    assert [name for name, *_ in calls] == ["o", "down"] * 3
    for name, start, fit, new in calls:
        err = lambda w: fit_error(fit.gram, fit.cross, fit.target_sq, w)  # noqa: E731
        assert fit.num_tokens == CALIB.numel()
        assert err(new) < err(start), name  # strictly: the closed form does not solve this problem
    # What the model holds is the refit weight (in the model's dtype).
    last_down = small.model.layers[2].mlp.down_proj.weight.detach().double().T
    torch.testing.assert_close(last_down, calls[-1][3].float().double())


def _activations(model, ids):
    """Per layer: the input of the layer, of post_attention_layernorm, o_proj and down_proj, and the output."""
    seen, hooks = {}, []
    for idx, layer in enumerate(model.model.layers):
        for name, module in (("layer", layer), ("mid", layer.post_attention_layernorm),
                             ("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            hooks.append(module.register_forward_pre_hook(
                lambda _, args, key=(idx, name): seen.setdefault(key, []).append(args[0].double())))
        hooks.append(layer.register_forward_hook(
            lambda _, __, out, idx=idx: seen.setdefault((idx, "out"), []).append(
                (out[0] if isinstance(out, tuple) else out).double())))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).reshape(-1, v[0].shape[-1]) for k, v in seen.items()}


@pytest.mark.parametrize("shape", [dict(), dict(family="qwen2")], ids=["gqa", "qwen2"])
def test_refit_statistics_are_the_compressed_inputs_against_the_original_outputs(monkeypatch, shape):
    """A hand computation on the finished model: layer 1 of 3, where the compressed stream already differs."""
    model = tiny_llama(layers=3, **shape)
    calls = _recording(monkeypatch)
    small = compress(model, ratio=0.4, method="quality")
    orig, comp = _activations(model, CALIB), _activations(small, CALIB)
    o_bias = small.model.layers[1].self_attn.o_proj.bias
    o_target = orig[(1, "mid")] - comp[(1, "layer")] - (0 if o_bias is None else o_bias.double())
    down_target = orig[(1, "out")] - comp[(1, "mid")]
    for (name, _, fit, _), x, t in ((calls[2], comp[(1, "o")], o_target), (calls[3], comp[(1, "down")], down_target)):
        assert name == ("o" if x is comp[(1, "o")] else "down")
        assert (comp[(1, "layer")] - orig[(1, "layer")]).abs().max() > 1e-3  # the streams differ here
        torch.testing.assert_close(fit.gram, x.T @ x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fit.cross, x.T @ t, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fit.target_sq, t.pow(2).sum().item(), rtol=1e-4, atol=1e-4)


def test_quality_is_closer_to_the_original_model_than_the_default_on_calibration_data():
    model = tiny_llama(layers=3)
    ref = logits(model, CALIB)
    err = lambda m: (logits(m, CALIB) - ref).pow(2).mean().item()  # noqa: E731
    default, quality = compress(model, ratio=0.4), compress(model, ratio=0.4, method="quality")
    assert err(quality) < 0.9 * err(default)


def test_quality_allocates_mixed_dims_within_the_uniform_budget():
    model = tiny_llama(layers=3)
    uniform = compress(model, ratio=0.4, allocation="uniform")
    quality = compress(model, ratio=0.4, method="quality")
    assert quality.config.a3_compression["a3_config"]["allocation"] == "mixed"
    # Never more parameters than the uniform model, short of its count by less than the largest unit
    # (a q/k rotary pair: 2 x hidden x (heads + kv heads)).
    assert 0 <= decoder_linear_params(uniform) - decoder_linear_params(quality) < 2 * 48 * (4 + 2)


def test_holding_no_mlp_intermediate_gives_the_same_model():
    model = tiny_llama(layers=3)
    held = compress(model, ratio=0.4, method="quality")
    lean = compress(model, ratio=0.4, method="quality", hold_mlp_intermediate=False)
    for k, v in held.state_dict().items():
        torch.testing.assert_close(lean.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_saved_checkpoint_reloads_without_optimum_a3(tmp_path):
    model, tok = tiny_llama(layers=3), tiny_tokenizer()
    compressor = A3Compressor(A3Config(ratio=0.25, method="quality"))
    small = compressor.compress(model, calibration_ids=CALIB, progress=False)
    compressor.save(small, tmp_path / "ckpt", tokenizer=tok)
    save_reference(small, PROBE, tmp_path / "ref.pt")
    reload_in_fresh_process(tmp_path / "ckpt", tmp_path / "ref.pt", cwd=tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(teacher_refit=True, sequential=False), "needs sequential"),
    (dict(method="quality", mlp_refit=True), "choose one"),
    (dict(method="paper", teacher_refit=True), "method='paper' means teacher_refit=False"),
    (dict(teacher_refit=True, teacher_damping=-1.0), "teacher_damping must be >= 0"),
    (dict(teacher_refit="yes"), "teacher_refit must be True or False"),
])
def test_invalid_teacher_settings_are_refused(kwargs, match):
    with pytest.raises(A3ConfigError, match=match):
        A3Config(ratio=0.2, **kwargs)
