"""Layer-streamed compression from safetensors, the statistics cache, bit-identical checkpoints, kill safety."""

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.config import A3ConfigError

from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIBRATION = random_token_windows(8, 32, seed=1)
REFIT_CALIBRATION = random_token_windows(16, 32, seed=1)  # 512 tokens: the refit needs 4 per MLP channel (96)


def _source(tmp_path, **kwargs) -> Path:
    """A tiny model saved as a plain safetensors checkpoint (with its tokenizer)."""
    src = tmp_path / "source"
    tiny_llama(**{"layers": 3, **kwargs}).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def _files(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def _in_memory_equivalent(config: A3Config) -> A3Config:
    """The config whose in-memory run gives what a layer-streamed run with ``config`` gives: method='default''s
    mixed allocation probes the whole model, so streamed it uses uniform dims."""
    return config.replaced(allocation="uniform") if config.probes_by_default else config


def _streaming_warning(config: A3Config):
    """The warning a layer-streamed run with ``config`` gives (none unless it falls back to uniform dims)."""
    if config.probes_by_default:
        return pytest.warns(UserWarning, match="method='default' uses uniform dims instead of its mixed allocation")
    return contextlib.nullcontext()


@pytest.mark.parametrize("options", [{"method": "paper"}, {"method": "default"}, {"refit_stride": 1},
                                     {"hold_mlp_intermediate": False, "refit_stride": 1},
                                     {"method": "quality", "allocation": "uniform"}],
                         ids=["paper", "default", "default-refit-every-token", "default-holding-no-intermediate",
                              "quality-uniform"])
def test_streamed_checkpoint_equals_in_memory_checkpoint(tmp_path, options):
    src = _source(tmp_path)
    refit = "refit_stride" in options
    calibration = REFIT_CALIBRATION if refit else CALIBRATION
    config = A3Config(ratio=0.25, nsamples=len(calibration), seqlen=32, **options)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    in_memory = tmp_path / "in_memory"
    compressor = A3Compressor(_in_memory_equivalent(config))
    compressed = compressor.compress(model, calibration_ids=calibration, progress=False)
    if refit:  # the refit cases must refit (too few calibration tokens would skip it)
        assert compressed.config.a3_compression["mlp_refit"] is True
    compressor.save(compressed, in_memory, tokenizer=tokenizer)
    streamed = tmp_path / "streamed"
    with _streaming_warning(config):
        A3Compressor(config).compress_checkpoint(src, streamed, calibration_ids=calibration, progress=False)
    a, b = _files(in_memory), _files(streamed)
    assert set(a) == set(b)
    assert a["model.safetensors"] == b["model.safetensors"]
    assert a == b


# Shapes beyond the tied GQA Llama above: an untied lm_head must be the source's own (not the embedding,
# not omitted), MHA takes the per-head G_z statistics, Qwen2 carries q/k/v biases, Qwen3 keeps q/k and its
# q/k norms; "text" calibrates from a text dataset through the checkpoint's own tokenizer instead of token ids.
SHAPES = {
    "untied-gqa": dict(tie=False),
    "mha-untied": dict(num_kv_heads=4, tie=False),
    "mha-tied-paper": dict(num_kv_heads=4, method="paper"),
    "qwen2-untied": dict(family="qwen2", tie=False),
    "qwen2-tied-paper": dict(family="qwen2", method="paper"),
    "qwen3-untied": dict(family="qwen3", tie=False),
    "text-untied": dict(tie=False, text=True),
}
TEXT = [f"Line {i}: a few words of calibration text, the quick brown fox {i * 13}." for i in range(40)]


@pytest.mark.filterwarnings("ignore:qk left uncompressed")
@pytest.mark.parametrize("shape", SHAPES)
def test_streamed_equals_in_memory_for_every_head_family_and_calibration_source(tmp_path, shape):
    from safetensors.torch import load_file

    kwargs = dict(SHAPES[shape])
    method, text = kwargs.pop("method", "default"), kwargs.pop("text", False)
    src = _source(tmp_path, **kwargs)
    config = A3Config(ratio=0.25, nsamples=8, seqlen=32, method=method, **({"dataset": TEXT} if text else {}))
    ids = None if text else CALIBRATION
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    compressor = A3Compressor(_in_memory_equivalent(config))
    compressor.save(compressor.compress(model, tokenizer, calibration_ids=ids, progress=False), tmp_path / "in_memory",
                    tokenizer=tokenizer)
    streamer = A3Compressor(config)
    with _streaming_warning(config):
        streamed = streamer.compress_checkpoint(src, tmp_path / "streamed", calibration_ids=ids, progress=False)
    a, b = _files(tmp_path / "in_memory"), _files(streamed)
    assert a == b
    if text:  # really calibrated on the text (not on ids), through the checkpoint's tokenizer
        assert streamer.last_calibration["dataset"] == f"{len(TEXT)} user-provided strings"
        assert compressor.last_calibration == streamer.last_calibration

    # Against the source itself, not only against the other path: the same bug on both paths passes the above.
    source, written = load_file(src / "model.safetensors"), load_file(Path(streamed) / "model.safetensors")
    assert torch.equal(written["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert torch.equal(written["model.norm.weight"], source["model.norm.weight"])
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in written
    else:
        assert not torch.equal(source["lm_head.weight"], source["model.embed_tokens.weight"])
        assert torch.equal(written["lm_head.weight"], source["lm_head.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(streamed, trust_remote_code=True).eval()
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("method", ["paper", "default"])
def test_streaming_holds_one_original_and_one_compressed_layer_and_one_shard_at_a_time(tmp_path, monkeypatch, method):
    """README (Big models): live at any time are the embedding, one original and one compressed layer and at most
    one output shard; the untied lm_head is only read at the end. Checked at every layer load, layer fill and
    shard write of a streamed run."""
    import optimum_a3.checkpoint.weights as weights_module
    import optimum_a3.pipeline.loop as loop_module
    import optimum_a3.pipeline.run as run_module
    from optimum_a3.checkpoint.shards import ShardWriter
    from optimum_a3.checkpoint.weights import LazyLayers

    src = _source(tmp_path, layers=4, tie=False)
    models, checks = {}, []

    def materialized(model) -> int:
        return sum(any(not p.is_meta for p in layer.parameters()) for layer in model.model.layers)

    def check(where, writer=None):
        original, compressed = models["original"], models.get("compressed")
        checks.append(where)
        assert materialized(original) <= 1, where
        assert compressed is None or materialized(compressed) <= 1, where
        assert not original.model.embed_tokens.weight.is_meta and original.lm_head.weight.is_meta, where
        if writer is not None:  # one shard's worth pending (or a single tensor bigger than a shard)
            assert writer.pending_bytes <= writer.max_bytes or len(writer.pending) == 1, where

    empty_model, empty_compressed = weights_module.empty_model, run_module.empty_compressed_model
    fill, load, add = loop_module.fill_layer, LazyLayers.load, ShardWriter.add

    def spy_empty_model(*args, **kwargs):  # the skeleton being streamed (built twice when the dtype is read)
        models["original"] = empty_model(*args, **kwargs)
        return models["original"]

    def spy_empty_compressed(*args, **kwargs):
        models["compressed"] = empty_compressed(*args, **kwargs)
        return models["compressed"]

    def spy_fill(target, state, strict):
        fill(target, state, strict)
        check("fill")

    def spy_load(self, idx):
        load(self, idx)
        check(f"load {idx}")

    def spy_add(self, tensors):
        add(self, tensors)
        check("write", self)

    monkeypatch.setattr(weights_module, "empty_model", spy_empty_model)
    monkeypatch.setattr(run_module, "empty_compressed_model", spy_empty_compressed)
    monkeypatch.setattr(loop_module, "fill_layer", spy_fill)
    monkeypatch.setattr(LazyLayers, "load", spy_load)
    monkeypatch.setattr(ShardWriter, "add", spy_add)

    config = A3Config(ratio=0.25, nsamples=8, seqlen=32, method=method)
    out = A3Compressor(config).compress_checkpoint(src, tmp_path / "out", calibration_ids=CALIBRATION,
                                                   progress=False, max_shard_size=20_000)
    assert len(list(Path(out).glob("model-*.safetensors"))) > 2
    layers = 4
    assert checks.count("write") == layers + 1 and checks.count("fill") == layers * (2 if method == "default" else 1)
    assert all(f"load {i}" in checks for i in range(layers))


def test_streamed_shards_reload_like_one_file(tmp_path):
    src = _source(tmp_path, tie=False)
    config = A3Config(ratio=0.25, method="paper", nsamples=8, seqlen=32)
    one = A3Compressor(config).compress_checkpoint(src, tmp_path / "one", calibration_ids=CALIBRATION, progress=False)
    many = A3Compressor(config).compress_checkpoint(src, tmp_path / "many", calibration_ids=CALIBRATION,
                                                    progress=False, max_shard_size=20_000)
    shards = sorted(p.name for p in Path(many).glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert (Path(many) / "model.safetensors.index.json").is_file()
    ids = random_token_windows(2, 16, seed=3)
    models = [AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval() for d in (one, many)]
    with torch.no_grad():
        assert torch.equal(models[0](ids).logits, models[1](ids).logits)


def test_identical_inputs_and_seed_give_bit_identical_checkpoints(tmp_path):
    src = _source(tmp_path)
    config = A3Config(ratio=0.3, method="paper", nsamples=8, seqlen=32, dataset=["some calibration text. " * 200])
    first = A3Compressor(config).compress_checkpoint(src, tmp_path / "a", progress=False)
    second = A3Compressor(config).compress_checkpoint(src, tmp_path / "b", progress=False)
    assert _files(first) == _files(second)
    other_seed = A3Compressor(A3Config(**{**config.to_dict(), "seed": 1})).compress_checkpoint(
        src, tmp_path / "c", progress=False)
    assert _files(other_seed)["model.safetensors"] != _files(first)["model.safetensors"]


def test_stats_cache_gives_the_same_checkpoint_and_skips_calibration(tmp_path):
    src = _source(tmp_path)
    cache = tmp_path / "cache"
    config = A3Config(ratio=0.25, method="paper", nsamples=8, seqlen=32)
    fresh = A3Compressor(config).compress_checkpoint(src, tmp_path / "fresh", calibration_ids=CALIBRATION,
                                                     progress=False)
    first = A3Compressor(config)
    first.compress_checkpoint(src, tmp_path / "first", calibration_ids=CALIBRATION, progress=False, stats_cache=cache)
    assert first.last_timings["stats_cache_hit"] is False
    assert len(list(cache.glob("a3-stats-*"))) == 1 and not list(cache.glob(".a3-stats.partial-*"))
    second = A3Compressor(config)
    second.compress_checkpoint(src, tmp_path / "second", calibration_ids=CALIBRATION, progress=False,
                               stats_cache=cache)
    assert second.last_timings["stats_cache_hit"] is True
    assert _files(fresh) == _files(tmp_path / "first") == _files(tmp_path / "second")
    # Another ratio reuses the entry; other calibration tokens do not.
    other = A3Compressor(A3Config(ratio=0.5, method="paper", nsamples=8, seqlen=32))
    other.compress_checkpoint(src, tmp_path / "half", calibration_ids=CALIBRATION, progress=False, stats_cache=cache)
    assert other.last_timings["stats_cache_hit"] is True
    new_data = A3Compressor(config)
    new_data.compress_checkpoint(src, tmp_path / "new", calibration_ids=random_token_windows(8, 32, seed=2), progress=False,
                                 stats_cache=cache)
    assert new_data.last_timings["stats_cache_hit"] is False
    assert len(list(cache.glob("a3-stats-*"))) == 2


def test_stats_cache_in_memory_and_refusal_with_sequential(tmp_path):
    model = tiny_llama(layers=3)
    config = A3Config(ratio=0.25, method="paper", nsamples=8, seqlen=32)
    a = A3Compressor(config).compress(model, calibration_ids=CALIBRATION, progress=False, stats_cache=tmp_path)
    reuse = A3Compressor(config)
    b = reuse.compress(model, calibration_ids=CALIBRATION, progress=False, stats_cache=tmp_path)
    assert reuse.last_timings["stats_cache_hit"] is True
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(A3ConfigError, match="sequential calibration cannot reuse"):
        A3Compressor(A3Config(ratio=0.25, sequential=True, nsamples=8, seqlen=32)).compress(
            model, calibration_ids=CALIBRATION, progress=False, stats_cache=tmp_path)


KILL_SCRIPT = textwrap.dedent("""
    import signal, sys, time
    # Ctrl-C as in a terminal: a parent that ignores SIGINT (seen in full test runs) passes that on to its
    # children, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import optimum_a3.pipeline.loop as loop
    from optimum_a3 import A3Compressor, A3Config

    solve = loop.solve_mlp  # once per layer
    calls = []

    def slow_solve(*args, **kwargs):
        print("solving", flush=True)
        # Two layers pass; the third stalls, so however late the test's signal comes, it lands mid-way.
        calls.append(None)
        time.sleep(0.5 if len(calls) <= 2 else 600)
        return solve(*args, **kwargs)

    loop.solve_mlp = slow_solve
    src, out, cache = sys.argv[1:4]
    config = A3Config(ratio=0.25, method="paper", nsamples=8, seqlen=32, dataset=["calibration text. " * 300])
    A3Compressor(config).compress_checkpoint(src, out, overwrite=True, progress=False, stats_cache=cache,
                                             max_shard_size=20_000)
    print("done", flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_killed_compression_leaves_the_output_dir_untouched(tmp_path, sig):
    src = _source(tmp_path, layers=6)
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    (out / "precious.txt").write_text("an earlier checkpoint")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path)}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), str(cache)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    watchdog = threading.Timer(300, proc.kill)  # a stuck child fails the test (EOF below) instead of hanging it
    watchdog.start()
    try:
        seen = 0
        while seen < 2:  # two layers solved (and written to the partial checkpoint), more to go
            line = proc.stdout.readline()
            assert line, stderr.read_text()[-2000:]
            seen += line.startswith("solving")
        # Half-written work exists, out of sight: shards in the partial checkpoint, layers in the partial cache.
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert len(partial) == 1 and list(partial[0].glob(".shard-*"))
        assert list(cache.glob(".a3-stats.partial-*/layer-*.safetensors"))
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # a check above failed: leave no stalled child behind
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode != 0
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "an earlier checkpoint"
    assert not list(cache.glob("a3-stats-*"))  # no half cache entry is visible
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")] + \
        list(cache.glob(".a3-stats.partial-*"))
    if sig == signal.SIGINT:  # the interpreter unwound: temporary directories are gone too
        assert not leftovers
    else:  # nothing could run: the hidden work directories stay until the next run to the same places
        assert len(leftovers) == 2
        config = A3Config(ratio=0.25, method="paper", nsamples=8, seqlen=32, dataset=["calibration text. " * 300])
        A3Compressor(config).compress_checkpoint(src, out, overwrite=True, progress=False, stats_cache=cache)
        assert not any(p.exists() for p in leftovers)
        assert (out / "config.json").is_file() and len(list(cache.glob("a3-stats-*"))) == 1


def test_stale_partial_directories_of_live_processes_and_other_hosts_are_kept(tmp_path):
    from optimum_a3.checkpoint.saving import _host, remove_stale_partials

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)  # that process has exited
    names = {"dead": f".out.partial-{_host()}-{dead_pid}-abc", "live": f".out.partial-{_host()}-{os.getpid()}-abc",
             "other host": f".out.partial-otherhost{_host()}-{dead_pid}-abc", "old": ".out.old-abc"}
    for name in names.values():
        (tmp_path / name).mkdir()
    assert remove_stale_partials(str(tmp_path), "out") == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
