"""Mixed-rank allocation (method page §6): exact budget, uniform on identical layers, reload."""

import gc
import weakref

import pytest
import torch

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.math import solvers
from optimum_a3.math.allocation import Track, greedy_allocate, mixed_dims
from optimum_a3.math.budget import LayerDims, decoder_linear_params
from reload_helpers import reload_in_fresh_process, save_reference
from tiny_models import random_token_windows, tiny_llama

CALIB = random_token_windows(6, 32, seed=21)


def identical_tracks(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.rand(7, generator=g, dtype=torch.float64).sort().values
    vo = torch.rand(15, generator=g, dtype=torch.float64).sort().values
    mlp = torch.rand(95, generator=g, dtype=torch.float64).sort().values
    return [t for i in range(layers) for t in (Track(i, "qk", 16, 2, 2 * 48 * 6, qk), Track(i, "ov", 16, 1, 48 * 6, vo),
                                               Track(i, "mlp", 96, 1, 3 * 48, mlp))]


def test_identical_layers_get_uniform_dims_and_the_budget_is_met():
    uniform = [LayerDims(12, 12, 72)] * 4
    dims = mixed_dims(identical_tracks(4), uniform)
    for field in ("head_dim_qk", "head_dim_vo", "intermediate_size"):
        values = [getattr(d, field) for d in dims]
        step = 2 if field == "head_dim_qk" else 1
        assert max(values) - min(values) <= step, (field, values)   # within one unit per tensor
    assert all(d.head_dim_qk == 12 for d in dims)                  # qk pool keeps its uniform budget
    removed = lambda ds: sum((16 - d.head_dim_qk) // 2 * 576 + (16 - d.head_dim_vo) * 288 + (96 - d.intermediate_size) * 144
                             for d in ds)  # noqa: E731
    assert 0 <= removed(dims) - removed(uniform) < 576              # overshoot below one unit


def test_capped_components_never_grow_past_uniform_and_the_budget_is_met():
    # Layer 0's v/o dims are dear: uncapped they take parameters from the MLPs and grow past uniform (a
    # larger KV cache); capped they stay at most uniform and the same budget is removed elsewhere.
    tracks = identical_tracks(3)
    tracks = [Track(t.layer, t.component, t.full, t.step, t.params_per_unit, t.marginal * 1e3)
              if (t.layer, t.component) == (0, "ov") else t for t in tracks]
    uniform = [LayerDims(12, 12, 72)] * 3
    removed = lambda ds: sum((16 - d.head_dim_vo) * 288 + (96 - d.intermediate_size) * 144 for d in ds)  # noqa: E731
    free, capped = mixed_dims(tracks, uniform), mixed_dims(tracks, uniform, capped=("qk", "ov"))
    assert free[0].head_dim_vo > 12                                   # what the cap is for
    assert all(d.head_dim_vo <= 12 and d.head_dim_qk <= 12 for d in capped)
    assert capped[0].head_dim_vo == 12                                # dear: shrunk no further than uniform
    for dims in (free, capped):
        assert 0 <= removed(dims) - removed(uniform) < 288            # the uniform budget, overshoot < one unit


@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_max_dim_factor_keeps_every_dim_near_uniform_and_the_budget_is_met(factor):
    # Layer 0 is dear and layer 2 cheap in every component: unbounded, the allocation moves far from uniform.
    scale = {0: 1e3, 1: 1.0, 2: 1e-3}
    tracks = [Track(t.layer, t.component, t.full, t.step, t.params_per_unit, t.marginal * scale[t.layer])
              for t in identical_tracks(3)]
    uniform = [LayerDims(12, 12, 72)] * 3
    free, bounded = mixed_dims(tracks, uniform), mixed_dims(tracks, uniform, max_factor=factor)
    assert free[2].intermediate_size < 72 / 2 and free[0].intermediate_size > 72 * 1.25  # what the bound is for
    for d in bounded:
        for dim, (full, uni, step) in zip((d.head_dim_qk, d.head_dim_vo, d.intermediate_size),
                                          ((16, 12, 2), (16, 12, 1), (96, 72, 1))):
            assert uni / factor <= dim <= min(full, uni * factor) and dim % step == 0, (factor, d)
    if factor == 1.0:
        assert bounded == uniform
    removed = lambda ds: sum((16 - d.head_dim_vo) * 288 + (96 - d.intermediate_size) * 144 for d in ds)  # noqa: E731
    assert 0 <= removed(bounded) - removed(uniform) < 288  # the uniform budget, overshoot < one unit


def test_greedy_prefers_cheap_units_and_meets_budget():
    cheap = Track(0, "mlp", 10, 1, 3, torch.linspace(0.0, 0.1, 9, dtype=torch.float64))
    dear = Track(1, "mlp", 10, 1, 3, torch.linspace(1.0, 2.0, 9, dtype=torch.float64))
    dims = greedy_allocate([cheap, dear], params_to_remove=30)
    assert dims == {(0, "mlp"): 1, (1, "mlp"): 9}     # 9 cheap units (27 params), then one dear unit
    assert greedy_allocate([cheap, dear], params_to_remove=0) == {(0, "mlp"): 10, (1, "mlp"): 10}


def test_mixed_model_has_the_uniform_parameter_count_and_reloads(tmp_path):
    model = tiny_llama(layers=3)
    uniform = A3Compressor(A3Config(ratio=0.3, allocation="uniform")).compress(model, calibration_ids=CALIB, progress=False)
    mixed_c = A3Compressor(A3Config(ratio=0.3, allocation="mixed"))
    mixed = mixed_c.compress(model, calibration_ids=CALIB, progress=False)
    units = 2 * 48 * (4 + 2)  # the largest unit (a rotary pair over all q/k heads)
    assert 0 <= decoder_linear_params(uniform) - decoder_linear_params(mixed) < 2 * units
    assert mixed.config.a3_compression["allocation"] == "mixed"
    out = tmp_path / "mixed"
    mixed_c.save(mixed, out)
    ref = tmp_path / "ref.pt"
    save_reference(mixed, random_token_windows(2, 20, seed=5), ref)
    reload_in_fresh_process(out, ref, cwd=tmp_path)


def test_sequential_calibration_is_exact_at_ratio_zero_and_changes_weights_when_compressing():
    model = tiny_llama(layers=3)
    seq0 = A3Compressor(A3Config(ratio=0.0, sequential=True)).compress(model, calibration_ids=CALIB, progress=False)
    ids = random_token_windows(2, 16, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(seq0(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    seq = A3Compressor(A3Config(ratio=0.3, sequential=True)).compress(model, calibration_ids=CALIB, progress=False)
    par = A3Compressor(A3Config(ratio=0.3, sequential=False)).compress(model, calibration_ids=CALIB, progress=False)
    first = "model.layers.0.self_attn.v_proj.weight"
    last = "model.layers.2.self_attn.v_proj.weight"
    assert torch.equal(seq.state_dict()[first], par.state_dict()[first])     # layer 0 sees the same inputs
    assert not torch.equal(seq.state_dict()[last], par.state_dict()[last])   # later layers do not


def _statistics_seen_by(compressed, original, idx, ids, refit_stride=1):
    """Reference statistics of layer ``idx`` computed by hand from the COMPRESSED model's activations:
    R_x (and G_z) of the original layer run on what compressed layer ``idx`` receives, and m_d / R_d of
    the original gate/up run on the residual stream after compressed layer ``idx``'s attention."""
    seen = {}
    target, layer = compressed.model.layers[idx], original.model.layers[idx]
    hooks = [target.register_forward_pre_hook(lambda m, a, k: seen.update(hidden=a[0] if a else k["hidden_states"]),
                                              with_kwargs=True),
             target.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.update(mid=a[0])),
             layer.register_forward_pre_hook(lambda m, a, k: seen.update(kwargs=k), with_kwargs=True)]
    with torch.no_grad():
        compressed(ids, use_cache=False)
        original(ids, use_cache=False)  # the original layer's RoPE tables and mask
        for h in hooks:
            h.remove()
        grabbed = {}
        hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: grabbed.update(x=a[0])),
                 layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: grabbed.update(z=a[0]))]
        kwargs = {k: v for k, v in seen["kwargs"].items() if k not in ("hidden_states", "past_key_values", "cache")}
        layer(seen["hidden"], **kwargs)
        for h in hooks:
            h.remove()
        n = layer.post_attention_layernorm(seen["mid"])
        d = layer.mlp.act_fn(layer.mlp.gate_proj(n)) * layer.mlp.up_proj(n)
    x = grabbed["x"].reshape(-1, grabbed["x"].shape[-1]).double()
    z = grabbed["z"].reshape(x.shape[0], original.config.num_attention_heads, -1).double()
    d = d.reshape(x.shape[0], -1).double()
    t = x.shape[0]
    return {"attn_input_autocorr": x.T @ x / t, "head_output_autocorr": torch.einsum("thi,thj->hij", z, z) / t,
            "down_input_sq_mean": d.pow(2).mean(0),
            # refit_stride: every stride-th token of each batch (32-token windows: of the flattened tokens too)
            "down_input_autocorr": refit_stride * d[::refit_stride].T @ d[::refit_stride] / t}


@pytest.mark.parametrize("hold", [True, False], ids=["held-intermediate", "recomputed-mlp"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_sequential_statistics_are_those_of_the_compressed_model(kv_heads, hold):
    """Sequential calibration: layer l's attention statistics are taken on the compressed layers < l, and
    its MLP statistics on the output of its own compressed attention (checked against a hand computation
    on the finished model), whether the MLP intermediate is held or the compressed MLP is re-run. The
    down_proj refit's weights are checked against the refit solved from the hand-computed R_d, which takes
    every token, or every second one (``refit_stride=2``, the default's, with the held intermediate here)."""
    model = tiny_llama(layers=3, num_kv_heads=kv_heads)
    ids = random_token_windows(24, 32, seed=8)  # 768 tokens: enough for the refit (4 per channel) at stride 2
    # Uniform dims: every layer's attention compressed, so layer 0's MLP statistics must differ (below).
    stride = 2 if hold else 1
    compressor = A3Compressor(A3Config(ratio=0.3, mlp_refit=True, batch_size=4, hold_mlp_intermediate=hold,
                                       allocation="uniform", refit_stride=stride))
    compressed = compressor.compress(model, calibration_ids=ids, progress=False, keep_statistics=True)
    assert compressor.last_effective_config.sequential and compressor.last_effective_config.mlp_refit
    for idx in range(3):
        ref = _statistics_seen_by(compressed, model, idx, ids, stride)
        got = compressor.last_statistics[idx]
        names = ["attn_input_autocorr", "down_input_sq_mean", "down_input_autocorr"]
        names += ["head_output_autocorr"] if kv_heads == 4 else []
        for name in names:
            torch.testing.assert_close(getattr(got, name), ref[name], rtol=1e-5, atol=1e-7, msg=f"layer {idx} {name}")
        w_down = model.model.layers[idx].mlp.down_proj.weight.detach().to(torch.float64).T
        width = compressed.model.layers[idx].mlp.down_proj.in_features
        kept = solvers.select_mlp_channels(w_down, got.down_input_sq_mean, width)
        r_d = ref["down_input_autocorr"]
        expected = solvers.refit_to_targets(r_d[kept][:, kept], r_d[kept] @ w_down, w_down[kept], 1e-6)
        torch.testing.assert_close(compressed.model.layers[idx].mlp.down_proj.weight.detach().T,
                                   expected.float(), rtol=1e-4, atol=1e-5, msg=f"layer {idx} refit")
        assert not torch.allclose(expected, w_down[kept], atol=1e-3)  # the refit did move the weights
    # ... and they differ from the original model's where it matters: layer 0's MLP already sees the
    # compressed attention.
    paper = A3Compressor(A3Config(ratio=0.3, sequential=False, batch_size=4))
    paper.compress(model, calibration_ids=ids, progress=False, keep_statistics=True)
    first_seq, first_par = compressor.last_statistics[0], paper.last_statistics[0]
    torch.testing.assert_close(first_seq.attn_input_autocorr, first_par.attn_input_autocorr)
    assert not torch.allclose(first_seq.down_input_sq_mean, first_par.down_input_sq_mean)


def test_holding_the_mlp_intermediate_or_not_gives_the_same_model(monkeypatch):
    """The compressed gate/up are the kept rows of the original ones, so slicing the original output (held)
    and re-running the compressed MLP (not held) propagate the same values to the next layer. Each mode
    is made to fail if it takes the other's path; when its compressed MLP runs, the mode that holds
    nothing must have let go of every original gate/up output, while the holding mode still has them.
    In both, the stream after attention of the layer's earlier batches is freed once their output is made."""
    from optimum_a3.models.adapters import LlamaFamilyAdapter

    model = tiny_llama(layers=3)
    outputs = []  # weak references to every down_proj input (gate/up output) of the original model
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: outputs.append(weakref.ref(args[0])))
             for layer in model.model.layers]
    alive_when_mlp_runs = {True: [], False: []}
    streams = []  # weak references to the streams after attention the compressed MLP has been given
    earlier_streams_alive = []

    def watched(path, hold):
        run = getattr(LlamaFamilyAdapter, path)

        def wrapper(self, layer, hidden, *args):
            gc.collect()
            alive_when_mlp_runs[hold].append(sum(ref() is not None for ref in outputs))
            earlier_streams_alive.append(sum(ref() is not None for ref in streams))
            streams.append(weakref.ref(hidden))
            return run(self, layer, hidden, *args)
        return wrapper

    def forbidden(*args, **kwargs):
        raise AssertionError("the other mode's path was taken")

    models = {}
    for hold, path, other_path in ((True, "mlp_residual_from_intermediate", "mlp_residual"),
                                   (False, "mlp_residual", "mlp_residual_from_intermediate")):
        outputs.clear()
        with monkeypatch.context() as patch:
            patch.setattr(LlamaFamilyAdapter, other_path, forbidden)
            patch.setattr(LlamaFamilyAdapter, path, watched(path, hold))
            models[hold] = A3Compressor(A3Config(ratio=0.3, hold_mlp_intermediate=hold)).compress(
                model, calibration_ids=CALIB, progress=False).state_dict()
    for h in hooks:
        h.remove()
    assert alive_when_mlp_runs[False] and not any(alive_when_mlp_runs[False])
    assert alive_when_mlp_runs[True] and all(alive_when_mlp_runs[True])
    assert len(earlier_streams_alive) == 2 * 3 * len(CALIB) and not any(earlier_streams_alive)  # batch_size 1
    assert models[True].keys() == models[False].keys()
    for name in models[True]:
        torch.testing.assert_close(models[True][name], models[False][name], rtol=1e-5, atol=1e-6, msg=name)
    paper = A3Compressor(A3Config(ratio=0.3, sequential=False)).compress(model, calibration_ids=CALIB, progress=False)
    last_down = "model.layers.2.mlp.down_proj.weight"  # and both are sequential: they differ from the paper's
    assert not torch.equal(models[False][last_down], paper.state_dict()[last_down])
