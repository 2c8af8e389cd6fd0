"""Measured sensitivity for the mixed allocation: the probes compute what the compressed model computes,
their KL is the KL of that model, and the allocator built on them meets the uniform budget."""

import copy
import dataclasses
import json

import pytest
import torch

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.math.allocation import Track, mixed_dims, scaled_by_sensitivity
from optimum_a3.math.budget import LayerDims, decoder_linear_params, kv_cache_bytes_per_token
from optimum_a3.models.adapters import adapter_for
from optimum_a3.pipeline.run import Calibration, _probe_windows
from optimum_a3.pipeline.sensitivity import SensitivityProbe, padded_component
from optimum_a3.pipeline.sources import OriginalForward
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(6, 24, seed=5)
PROBE = random_token_windows(3, 16, seed=9)

CASES = {
    "gqa": dict(),
    "mha": dict(num_kv_heads=4),
    "qwen2-biases": dict(family="qwen2"),
}
ONE_COMPONENT = {"qk": {"head_dim_qk": 8}, "ov": {"head_dim_vo": 5}, "mlp": {"intermediate_size": 37}}


def original_statistics(model):
    adapter = adapter_for(model)
    geometry = adapter.geometry(model)
    source = OriginalForward(model, adapter, geometry, CALIB, batch_size=2, want_head_autocorr=geometry.is_mha,
                             want_down_autocorr=False)
    stats = []
    for idx, layer in enumerate(adapter.layers(model)):
        stats.append(source.attention(idx, layer))
        source.advance(idx, layer, None, None)
    return adapter, geometry, stats


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("component", list(ONE_COMPONENT))
def test_padded_component_computes_what_the_compressed_model_computes(case, component):
    """Layer 1 of the original model with the padded weights gives the logits of the A3 model whose
    layer 1 alone has that component compressed (paper statistics, so both see the same statistics)."""
    model = tiny_llama(**CASES[case]).eval()
    adapter, geometry, stats = original_statistics(model)
    full = LayerDims(geometry.head_dim, geometry.head_dim, geometry.intermediate_size)
    (name, value), = ONE_COMPONENT[component].items()
    dims = LayerDims(**{**vars(full), name: value})
    config = A3Config(method="paper", components=(component,), **{name: [getattr(full, name), value]})
    small = A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)
    probed = copy.deepcopy(model)
    layer = adapter.layers(probed)[1]
    values = padded_component(adapter, layer, stats[1], geometry, dims, component, config)
    assert values and all(v.shape == p.shape for p, v in values.items())
    with torch.no_grad():
        for p, v in values.items():
            p.copy_(v)
    torch.testing.assert_close(logits(probed, PROBE), logits(small, PROBE), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(probed, PROBE), logits(model, PROBE), atol=1e-3)  # it did change something


def test_probe_kl_is_the_kl_of_the_probed_model_and_restores_the_weights():
    model = tiny_llama().eval()
    adapter, geometry, stats = original_statistics(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = SensitivityProbe(model, adapter, PROBE, batch_size=2)
    dims = LayerDims(8, 5, 37)
    for idx in range(geometry.num_layers):
        for component in ("qk", "ov", "mlp"):
            values = padded_component(adapter, adapter.layers(model)[idx], stats[idx], geometry, dims, component,
                                      A3Config(method="paper", ratio=0.2))
            kl = probe.kl(idx, values)
            probed = copy.deepcopy(model)
            names = {id(p): n for n, p in model.named_parameters()}
            params = dict(probed.named_parameters())
            with torch.no_grad():
                for p, v in values.items():
                    params[names[id(p)]].copy_(v)
            reference = torch.log_softmax(logits(model, PROBE), -1)
            expected = (reference.exp() * (reference - torch.log_softmax(logits(probed, PROBE), -1))).sum(-1).mean()
            assert kl == pytest.approx(expected.item(), rel=1e-4, abs=1e-7) and kl > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # put back after every probe
    assert probe.kl(0, {}) == pytest.approx(0.0, abs=1e-7)


def test_sensitivity_scaling_keeps_each_curve_and_prices_the_probe_dim_at_its_kl():
    tracks = [Track(0, "ov", 8, 1, 10, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)),
              Track(1, "ov", 8, 1, 10, torch.tensor([0.5] * 7, dtype=torch.float64)),
              Track(0, "mlp", 6, 1, 3, torch.tensor([1.0, 1.0, 2.0, 2.0, 9.0], dtype=torch.float64)),
              Track(1, "mlp", 6, 1, 3, torch.tensor([1.0, 1.0, 2.0, 2.0, 9.0], dtype=torch.float64))]
    probe_dims = {(0, "ov"): 6, (1, "ov"): 6, (0, "mlp"): 4, (1, "mlp"): 6}  # (1, mlp): nothing removed
    kl = {(0, "ov"): 0.3, (1, "ov"): 4.0, (0, "mlp"): 0.2, (1, "mlp"): 0.0}
    scaled = scaled_by_sensitivity(tracks, probe_dims, kl)
    assert scaled[0].marginal[:2].sum().item() == pytest.approx(0.3)
    assert scaled[1].marginal[:2].sum().item() == pytest.approx(4.0)
    assert scaled[2].marginal[:2].sum().item() == pytest.approx(0.2)
    for old, new in zip(tracks, scaled):
        ratio = new.marginal / old.marginal
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # the shape is kept
    assert torch.allclose(scaled[3].marginal, tracks[3].marginal * 0.1)  # median of the measured mlp scales
    # One pool: the allocation removes the uniform model's parameters, from where the measured KL is lowest.
    uniform = [LayerDims(2, 6, 4), LayerDims(2, 6, 4)]
    dims = mixed_dims(scaled, uniform, pools=(("ov", "mlp"),))
    removed = sum((8 - d.head_dim_vo) * 10 + (6 - d.intermediate_size) * 3 for d in dims)
    assert 0 <= removed - (2 * 2 * 10 + 2 * 2 * 3) < 10
    assert dims[1].head_dim_vo > dims[0].head_dim_vo  # layer 1's v/o dims cost 13x more KL per unit


def test_mixed_allocation_from_probes_meets_the_uniform_budget_and_moves_dims_between_layers():
    model = tiny_llama(layers=3).eval()
    uniform = A3Compressor(A3Config(ratio=0.3, method="paper")).compress(model, calibration_ids=CALIB, progress=False)
    config = A3Config(ratio=0.3, allocation="mixed", sequential=False, sensitivity_tokens=40)
    mixed = A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)
    # Never more parameters than the uniform model, short of its count by less than the largest unit
    # (a q/k rotary pair: 2 x hidden x (heads + kv heads)).
    assert 0 <= decoder_linear_params(uniform) - decoder_linear_params(mixed) < 2 * 48 * (4 + 2)
    cfg = mixed.config
    dims = list(zip(cfg.head_dim_qk, cfg.head_dim_vo, cfg.intermediate_size)) if isinstance(cfg.head_dim_qk, list) \
        else None
    assert dims is not None and len(set(dims)) > 1  # per-layer dims, not the uniform ones
    assert mixed.config.a3_compression["a3_config"]["sensitivity_tokens"] == 40
    # Analytical errors alone (the allocation before the probes) give other dims.
    analytical = A3Compressor(A3Config(ratio=0.3, allocation="mixed", sequential=False, sensitivity_tokens=0)).compress(
        model, calibration_ids=CALIB, progress=False)
    assert analytical.config.head_dim_qk != cfg.head_dim_qk or analytical.config.intermediate_size != cfg.intermediate_size


def test_capped_kv_dims_keep_the_kv_cache_within_the_uniform_models():
    model = tiny_llama(layers=3).eval()
    uniform = A3Compressor(A3Config(ratio=0.3, method="paper")).compress(model, calibration_ids=CALIB, progress=False)
    config = A3Config(ratio=0.3, allocation="mixed", sequential=False, sensitivity_tokens=40, cap_kv_dims=True)
    capped = A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)
    dims = capped.config.a3_compression["dims"]
    limit = uniform.config.a3_compression["dims"]
    for name in ("head_dim_qk", "head_dim_vo"):
        assert all(d <= u for d, u in zip(dims[name], limit[name])), (name, dims[name], limit[name])
    assert kv_cache_bytes_per_token(capped) <= kv_cache_bytes_per_token(uniform)
    assert 0 <= decoder_linear_params(uniform) - decoder_linear_params(capped) < 2 * 48 * (4 + 2)
    assert capped.config.a3_compression["a3_config"]["cap_kv_dims"] is True


def test_sequential_calibration_after_a_mixed_allocation():
    """The dims come from a first pass on the original model; the layers are then calibrated sequentially."""
    model = tiny_llama(layers=3).eval()
    first = A3Compressor(A3Config(ratio=0.3, allocation="mixed", sequential=False, sensitivity_tokens=40))
    plain = first.compress(model, calibration_ids=CALIB, progress=False)
    config = A3Config(ratio=0.3, allocation="mixed", sensitivity_tokens=40, allocation_windows=0)
    assert config.sequential  # the default method's
    sequential = A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)
    for name in ("head_dim_qk", "head_dim_vo", "intermediate_size"):
        assert getattr(sequential.config, name) == getattr(plain.config, name)
    assert sequential.config.a3_compression["sequential"] is True
    assert not torch.equal(logits(sequential, PROBE), logits(plain, PROBE))  # other statistics, other weights


def test_the_first_pass_takes_the_first_allocation_windows_only():
    """With sequential calibration the first pass only prices the dims: method='default' takes it on one
    window, so its dims are those of a one-pass allocation on that window, while every window calibrates."""
    model = tiny_llama(layers=3).eval()
    config = A3Config(ratio=0.3, sensitivity_tokens=16)  # a prefix of the first window
    assert (config.allocation, config.allocation_windows, config.sequential) == ("mixed", 1, True)  # the default's
    default = A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)
    on_one = A3Compressor(A3Config(ratio=0.3, sequential=False, sensitivity_tokens=16)).compress(
        model, calibration_ids=CALIB[:1], progress=False)
    on_all = A3Compressor(A3Config(ratio=0.3, sequential=False, sensitivity_tokens=16)).compress(
        model, calibration_ids=CALIB, progress=False)
    dims = lambda m: m.config.a3_compression["dims"]  # noqa: E731
    assert dims(default) == dims(on_one) != dims(on_all)  # the windows priced the dims
    assert default.config.a3_compression["calibration"]["nsamples"] == len(CALIB)  # ... and all calibrate


def test_mixed_allocation_probes_need_the_whole_model_and_the_windows(tmp_path):
    from optimum_a3.config import A3ConfigError

    model = tiny_llama().eval()
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    config = A3Config(ratio=0.3, allocation="mixed", sequential=False)
    with pytest.raises(A3ConfigError, match="layer-streamed compression does not hold"):
        A3Compressor(config).compress_checkpoint(tmp_path / "base", tmp_path / "out", calibration_ids=CALIB,
                                                 progress=False)
    assert not (tmp_path / "out").exists()
    streamed = A3Config(ratio=0.3, allocation="mixed", sequential=False, sensitivity_tokens=0)
    A3Compressor(streamed).compress_checkpoint(tmp_path / "base", tmp_path / "out", calibration_ids=CALIB, progress=False)
    paper = A3Compressor(A3Config(ratio=0.3, method="paper"))
    paper.compress(model, calibration_ids=CALIB, progress=False, keep_statistics=True)
    with pytest.raises(A3ConfigError, match="pass calibration_ids with the reused statistics"):
        A3Compressor(config).compress(model, statistics=paper.last_statistics, progress=False)
    reused = A3Compressor(config).compress(model, statistics=paper.last_statistics, calibration_ids=CALIB,
                                           progress=False)
    direct = A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)
    assert torch.equal(logits(reused, PROBE), logits(direct, PROBE))
    for bad in (-1, 1.5, "8"):
        with pytest.raises(A3ConfigError, match="sensitivity_tokens"):
            A3Config(ratio=0.3, allocation="mixed", sensitivity_tokens=bad)


def test_the_methods_resolve_their_allocation_and_a_streamed_default_falls_back_to_uniform(tmp_path):
    from optimum_a3.config import A3ConfigError

    resolved = lambda c: (c.allocation, c.sensitivity_tokens, c.allocation_windows)  # noqa: E731
    assert resolved(A3Config(ratio=0.2)) == ("mixed", 64, 1)
    assert resolved(A3Config(ratio=0.2, method="quality")) == ("mixed", 1024, 0)
    assert resolved(A3Config(ratio=0.2, method="paper"))[0] == "uniform"
    assert resolved(A3Config(ratio=0.2, sensitivity_tokens=64, allocation_windows=3)) == ("mixed", 64, 3)
    # The default refits down_proj; an asked-for teacher refit replaces that refit, an asked-for one with it is refused.
    assert A3Config(ratio=0.2).mlp_refit and not A3Config(ratio=0.2, method="quality").mlp_refit
    assert not A3Config(ratio=0.2, method="paper").mlp_refit
    assert not A3Config(ratio=0.2, teacher_refit=True).mlp_refit
    with pytest.raises(A3ConfigError, match="choose one"):
        A3Config(ratio=0.2, teacher_refit=True, mlp_refit=True)
    # R_d on every fourth token in the default's sequential pass only: the original model's statistics take every one.
    assert [A3Config(ratio=0.2, **kw).refit_stride for kw in ({}, {"sequential": False}, {"method": "paper"})] == [4, 1, 1]
    for bad, why in ((0, "refit_stride must be >= 1"), (-2, "refit_stride must be >= 1")):
        with pytest.raises(A3ConfigError, match=why):
            A3Config(ratio=0.2, refit_stride=bad)
    with pytest.raises(A3ConfigError, match="refit_stride > 1 needs sequential calibration"):
        A3Config(ratio=0.2, refit_stride=2, sequential=False)
    # Explicit dims are the caller's allocation; asked for with them, mixed is still refused.
    assert A3Config(head_dim_qk=8, components=["qk"]).allocation == "uniform"
    assert A3Config(ratio=0.2, intermediate_size=40, method="quality").allocation == "uniform"
    with pytest.raises(A3ConfigError, match="give a ratio and no explicit dims"):
        A3Config(ratio=0.2, intermediate_size=40, allocation="mixed")
    with pytest.raises(A3ConfigError, match="allocation_windows must be >= 0"):
        A3Config(ratio=0.2, allocation_windows=-1)
    with pytest.raises(A3ConfigError, match="method='paper' means allocation='uniform'"):
        A3Config(ratio=0.2, method="paper", allocation="mixed")
    # Records from before these options: all windows and 1024 probe tokens, whatever the method now says.
    old = {k: v for k, v in A3Config(ratio=0.2).to_dict().items()
           if k not in ("allocation_windows", "sensitivity_tokens", "refit_stride")}
    assert resolved(A3Config.from_dict(old)) == ("mixed", 1024, 0) and A3Config.from_dict(old).refit_stride == 1
    assert A3Config.from_dict(A3Config(ratio=0.2).to_dict()) == A3Config(ratio=0.2)

    # Layer-streamed: the default's probes would need the whole model, so it uses uniform dims, loudly; an
    # asked-for mixed allocation (or the quality method's) is refused instead (the test above).
    default = A3Config(ratio=0.3, sensitivity_tokens=16)
    with pytest.warns(UserWarning, match="uses uniform dims instead of its mixed allocation"):
        assert default.for_layer_streaming() == dataclasses.replace(default, allocation="uniform")
    # replaced() keeps the method's options the method's (they resolve again); dataclasses.replace fixes them.
    assert default.replaced(sequential=False).refit_stride == 1
    with pytest.raises(A3ConfigError, match="refit_stride > 1 needs sequential calibration"):
        dataclasses.replace(default, sequential=False)
    assert A3Config(ratio=0.3, refit_stride=4).replaced(mlp_refit=True).refit_stride == 4
    for kept in (A3Config(ratio=0.3, allocation="mixed"), A3Config(ratio=0.3, method="quality"),
                 A3Config(ratio=0.3, allocation="uniform"), A3Config(ratio=0.3, sensitivity_tokens=0)):
        assert kept.for_layer_streaming() is kept
    model = tiny_llama().eval()
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="uses uniform dims instead"):
        A3Compressor(default).compress_checkpoint(tmp_path / "base", tmp_path / "out", calibration_ids=CALIB,
                                                  progress=False)
    record = json.loads((tmp_path / "out" / "config.json").read_text())["a3_compression"]
    assert record["allocation"] == "uniform" and record["preset"] == "default"
    with pytest.raises(A3ConfigError, match="layer-streamed compression does not hold"):
        A3Compressor(A3Config(ratio=0.3, method="quality")).compress_checkpoint(
            tmp_path / "base", tmp_path / "refused", calibration_ids=CALIB, progress=False)


def test_probe_tokens_are_a_prefix_of_the_first_window_or_whole_windows():
    ids = torch.arange(3 * 16).reshape(3, 16)
    calibration = Calibration(ids, {})
    assert torch.equal(_probe_windows(calibration, A3Config(ratio=0.2, sensitivity_tokens=5)), ids[:1, :5])
    assert torch.equal(_probe_windows(calibration, A3Config(ratio=0.2, sensitivity_tokens=16)), ids[:1])
    assert torch.equal(_probe_windows(calibration, A3Config(ratio=0.2, sensitivity_tokens=17)), ids[:2])
    assert torch.equal(_probe_windows(calibration, A3Config(ratio=0.2, sensitivity_tokens=999)), ids)


def test_the_probes_and_their_first_pass_take_no_refit(monkeypatch):
    """With sequential calibration the mixed allocation's first pass only prices the dims: it collects no R_d and
    its probes measure the closed form, so the down_proj refit is solved once per layer, in the sequential pass
    (a first pass on one window has too few tokens for it). Without sequential calibration the first pass's
    statistics are the run's: they hold R_d."""
    from optimum_a3.math import solvers
    from optimum_a3.pipeline import statistics

    refits, collectors = [], []
    real_refit, real_init = solvers.refit_down_proj, statistics.StatisticsCollector.__init__
    monkeypatch.setattr(solvers, "refit_down_proj", lambda *a, **k: refits.append(1) or real_refit(*a, **k))

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        collectors.append(self)

    monkeypatch.setattr(statistics.StatisticsCollector, "__init__", init)
    model = tiny_llama()
    calib = random_token_windows(16, 48, seed=6)  # 768 tokens: the default's stride gives way to 1, 8 per channel
    config = A3Config(ratio=0.3, sensitivity_tokens=16)  # the default: mixed, sequential, mlp_refit
    small = A3Compressor(config).compress(model, calibration_ids=calib, progress=False)
    layers = model.config.num_hidden_layers
    assert small.config.a3_compression["mlp_refit"] is True
    compressed_mlps = sum(w < model.config.intermediate_size for w in small.config.a3_compression["dims"]["intermediate_size"])
    assert len(refits) == compressed_mlps > 0
    assert [c.want_down_autocorr for c in collectors] == [False] * layers + [True] * layers
    refits.clear(), collectors.clear()
    A3Compressor(A3Config(ratio=0.3, sensitivity_tokens=16, sequential=False)).compress(model, calibration_ids=calib,
                                                                                    progress=False)
    assert [c.want_down_autocorr for c in collectors] == [True] * layers and len(refits) > compressed_mlps
