"""Mixed-rank allocation (method page §6): exact budget, uniform on identical layers, reload."""


import torch

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.allocation import Track, greedy_allocate, mixed_dims
from optimum_a3.budget import LayerDims, decoder_linear_params
from reload_helpers import reload_in_fresh_process, save_reference
from tiny_models import random_token_windows, tiny_llama

CALIB = random_token_windows(6, 32, seed=21)


def identical_tracks(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.rand(7, generator=g, dtype=torch.float64).sort().values
    vo = torch.rand(15, generator=g, dtype=torch.float64).sort().values
    mlp = torch.rand(95, generator=g, dtype=torch.float64).sort().values
    return [t for i in range(layers) for t in (Track(i, "qk", 16, 2, 2 * 48 * 6, qk), Track(i, "vo", 16, 1, 48 * 6, vo),
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
