"""The statistics cache serves only the model and data it was computed on; a damaged entry is detected,
named, deleted and recomputed; losing a commit race keeps the winner's entry. In memory and streamed."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import optimum_a3.checkpoint.stats_cache as stats_cache
from optimum_a3 import A3Compressor, A3Config

from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIBRATION = random_token_windows(4, 16, seed=1)
CONFIG = A3Config(ratio=0.25, method="paper", nsamples=4, seqlen=16)
MODES = ["in_memory", "streamed"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine their contention costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> torch.nn.Module:
    return tiny_llama(layers=3)


def _as_input(mode: str, model: torch.nn.Module, directory: Path):
    """The model itself (in memory) or a checkpoint directory of it (streamed)."""
    if mode == "in_memory":
        return model
    src = Path(tempfile.mkdtemp(dir=directory, prefix="source-"))
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def _compress(source, cache=None, config=CONFIG) -> tuple[dict[str, str], A3Compressor]:
    """Compress an in-memory model or a checkpoint directory (streamed, in small shards so that a restart
    happens after shards were flushed). Returns a sha256 per output tensor (in memory) or per output file
    (streamed), and the compressor."""
    compressor = A3Compressor(config)
    if isinstance(source, Path):
        out = Path(tempfile.mkdtemp(dir=source.parent, prefix="out-"))
        compressor.compress_checkpoint(source, out, calibration_ids=CALIBRATION, progress=False, stats_cache=cache,
                                       max_shard_size=20_000)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()}, compressor
    compressed = compressor.compress(source, calibration_ids=CALIBRATION, progress=False, stats_cache=cache)
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in compressed.state_dict().items()}, compressor


@pytest.fixture(scope="module", params=MODES)
def base(request, tmp_path_factory):
    """The base model in one mode, its result without a cache, and a cache holding its entry."""
    root = tmp_path_factory.mktemp(request.param)
    source = _as_input(request.param, _model(), root)
    fresh, _ = _compress(source)
    cache = root / "cache"
    first, compressor = _compress(source, cache)
    assert first == fresh and compressor.last_timings["stats_cache_hit"] is False
    return SimpleNamespace(mode=request.param, source=source, fresh=fresh, cache=cache)


def _copy_of_cache(base, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base.cache, tmp_path / "cache"))


@contextlib.contextmanager
def _cache_warnings():
    """Collect the messages of the statistics cache's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = []
        yield messages
    messages += [str(w.message) for w in caught if "statistics cache" in str(w.message)]


def _entry(cache: Path) -> Path:
    entries = list(cache.glob("a3-stats-*"))
    assert len(entries) == 1, entries
    return entries[0]


def _assert_sound_entry(cache: Path) -> None:
    """The cache holds one entry, and every layer of it passes the checks of a read."""
    entry = _entry(cache)
    reader = stats_cache.StatisticsCache(str(cache), entry.name[len("a3-stats-"):])
    with _cache_warnings() as messages:
        assert reader.covers(3, want_head_autocorr=False, want_down_autocorr=False)
        for idx in range(3):
            reader.load(idx)
    assert messages == []
    assert not list(cache.glob(".a3-stats.partial-*"))


# ------------------------------------------------------------------------------ another model, same key
def _altered(model: torch.nn.Module, part: str) -> torch.nn.Module:
    tensor = {"embeddings": model.model.embed_tokens.weight,
              "middle layer": model.model.layers[1].mlp.up_proj.weight,
              "layer-0 v_proj": model.model.layers[0].self_attn.v_proj.weight}[part]
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model


@pytest.mark.parametrize("part,warned_layer", [("embeddings", None), ("middle layer", 1), ("layer-0 v_proj", 0)])
def test_a_model_differing_in_one_part_does_not_reuse_the_entry(base, tmp_path, part, warned_layer):
    cache = _copy_of_cache(base, tmp_path)
    base_entry = _entry(cache)
    other = _as_input(base.mode, _altered(_model(), part), tmp_path)
    fresh, _ = _compress(other)
    with _cache_warnings() as messages:
        cached, compressor = _compress(other, cache)
    assert cached == fresh
    assert compressor.last_timings["stats_cache_hit"] is False
    if warned_layer is None:  # the embeddings are in the key: another entry, nothing to warn about
        assert messages == [] and len(list(cache.glob("a3-stats-*"))) == 2
    else:  # the same key: the layer digests tell the models apart, and the other model's entry is replaced
        assert messages == [f"statistics cache entry {base_entry}: was computed for another model (decoder layer "
                            f"{warned_layer}'s weights differ); deleting the entry and recomputing the statistics"]
        assert _entry(cache) == base_entry
    again, compressor = _compress(other, cache)
    assert again == fresh and compressor.last_timings["stats_cache_hit"] is True


def test_the_key_changes_with_the_library_version(tmp_path, monkeypatch):
    key = stats_cache.statistics_key(_model().config.to_dict(), "embeddings digest", CALIBRATION)
    monkeypatch.setattr(stats_cache, "__version__", "999.0")
    assert stats_cache.statistics_key(_model().config.to_dict(), "embeddings digest", CALIBRATION) != key


def test_another_library_version_does_not_reuse_the_entry(base, tmp_path, monkeypatch):
    cache = _copy_of_cache(base, tmp_path)
    monkeypatch.setattr(stats_cache, "__version__", "999.0")
    result, compressor = _compress(base.source, cache)
    assert result == base.fresh and compressor.last_timings["stats_cache_hit"] is False
    assert len(list(cache.glob("a3-stats-*"))) == 2


# ------------------------------------------------------------------------------ damaged entries
def _flip_bytes(entry: Path) -> None:
    path = entry / "layer-00001.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, past the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_tensor(entry: Path, value=None, update_checksum=False) -> None:
    """Rewrite layer 1's file as valid safetensors with other values (``value`` at one place, else scaled)."""
    path = entry / "layer-00001.safetensors"
    tensors = load_file(path)
    if value is None:
        tensors["attn_input_autocorr"] *= 1.5
    else:
        tensors["attn_input_autocorr"][0, 0] = value
    save_file(tensors, path)
    meta = json.loads((entry / "meta.json").read_text())
    if update_checksum and "layers" in meta:  # as if written with these values: only the finite check can tell
        meta["layers"][1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (entry / "meta.json").write_text(json.dumps(meta))


def _edit_meta(entry: Path, **fields) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, **fields}))


DAMAGES = {
    "flipped bytes": (_flip_bytes, "layer-00001.safetensors does not match its sha256 in meta.json (corrupted or edited)"),
    "edited tensor": (_edit_tensor, "layer-00001.safetensors does not match its sha256 in meta.json (corrupted or edited)"),
    "deleted file": (lambda e: (e / "layer-00001.safetensors").unlink(), "layer-00001.safetensors is missing"),
    "nan": (lambda e: _edit_tensor(e, float("nan"), update_checksum=True),
            "layer-00001.safetensors holds non-finite values (layer 1: non-finite values in attn_input_autocorr)"),
    "garbled meta.json": (lambda e: (e / "meta.json").write_text("{not json"), "meta.json is unreadable ("),
    "meta.json without checksums": (lambda e: _edit_meta(e, layers=[]), "meta.json lacks fields or has malformed ones"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_entry_is_named_deleted_and_recomputed(base, tmp_path, damage):
    damage_entry, problem = DAMAGES[damage]
    cache = _copy_of_cache(base, tmp_path)
    entry = _entry(cache)
    damage_entry(entry)
    with _cache_warnings() as messages:
        recomputed, compressor = _compress(base.source, cache)
    assert recomputed == base.fresh
    assert compressor.last_timings["stats_cache_hit"] is False
    assert len(messages) == 1
    assert messages[0].startswith(f"statistics cache entry {entry}: {problem}")
    assert messages[0].endswith("; deleting the entry and recomputing the statistics")
    _assert_sound_entry(cache)  # written again, whole


# ------------------------------------------------------------------------------ concurrent writers
@pytest.mark.parametrize("moment", ["before the commit", "between the check and the rename"])
def test_losing_the_commit_race_keeps_the_winners_entry(base, tmp_path, monkeypatch, moment):
    """Another process publishes the same entry while this one computes it."""
    winner = Path(shutil.copytree(_entry(base.cache), tmp_path / "winner"))
    (winner / "winner.txt").write_text("the other writer's entry")
    cache = tmp_path / "cache"
    target = cache / _entry(base.cache).name

    def publish_the_winner():
        shutil.copytree(winner, target)

    if moment == "before the commit":
        commit = stats_cache.StatisticsCacheWriter.commit

        def commit_after_the_winner(self):
            publish_the_winner()
            commit(self)

        monkeypatch.setattr(stats_cache.StatisticsCacheWriter, "commit", commit_after_the_winner)
    else:
        rename = os.rename

        def rename_after_the_winner(src, dst, *args, **kwargs):
            if os.fspath(dst) == str(target) and not target.exists():
                publish_the_winner()  # at the last moment: our rename meets a non-empty directory
            return rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "rename", rename_after_the_winner)
    with _cache_warnings() as messages:
        result, compressor = _compress(base.source, cache)
    monkeypatch.undo()
    assert result == base.fresh and compressor.last_timings["stats_cache_hit"] is False and messages == []
    assert _entry(cache) == target and (target / "winner.txt").is_file()
    _assert_sound_entry(cache)  # and ours is gone


def test_an_entry_with_fewer_statistics_is_replaced(tmp_path):
    """A refit run needs the down_proj autocorrelation: it recomputes and replaces the entry without it."""
    model, cache = _model(), tmp_path / "cache"
    calibration = random_token_windows(12, 32, seed=1)  # enough tokens for refit (4 per MLP channel)
    options = dict(ratio=0.25, method="default", sequential=False, nsamples=12, seqlen=32)
    A3Compressor(A3Config(**options, mlp_refit=False)).compress(model, calibration_ids=calibration, progress=False,
                                                                stats_cache=cache)
    assert json.loads((_entry(cache) / "meta.json").read_text())["down_input_autocorr"] is False
    for hit in (False, True):
        refit = A3Compressor(A3Config(**options, mlp_refit=True))
        refit.compress(model, calibration_ids=calibration, progress=False, stats_cache=cache)
        assert refit.last_timings["stats_cache_hit"] is hit
    assert json.loads((_entry(cache) / "meta.json").read_text())["down_input_autocorr"] is True
