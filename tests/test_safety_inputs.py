"""Bad inputs found by an adversarial pass (issue 20, items 5-7): each fails at once with one clear error
naming the file, tensor or key (exit status 2 and one line in the CLI), and nothing is written.

Covered: a non-UTF-8 calibration text, a truncated or damaged safetensors file, a config.json that lacks
a key the weights need (transformers' default would not fit them), a checkpoint without a tokenizer,
NaN/Inf weights (named, in the layers and outside them, read or written), A3Config values of the wrong
type, and a config.json describing fewer layers than the shards hold.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from optimum_a3 import A3Compressor, A3Config, A3ConfigError
from optimum_a3.cli import main
from optimum_a3.calibration.text import DataSourceError, load_rows
from optimum_a3.checkpoint.loading import ModelLoadError, load_model_and_tokenizer
from optimum_a3.checkpoint.shards import ShardWriter
from optimum_a3.checkpoint.weights import empty_model
from optimum_a3.checkpoint.weight_checks import NonFiniteWeightsError
from tiny_models import tiny_llama, tiny_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly vex a jovial king".split()
SMALL_RUN = ["--ratio", "0.25", "--nsamples", "2", "--seqlen", "16"]
MODES = ["--no-low-memory", "--low-memory"]  # in memory, streamed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny Llama checkpoint (GQA, head_dim 16 != hidden/heads, tied embeddings) with its tokenizer, a
    calibration text, and the same text in Latin-1."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    lines = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) + f" {i}." for i in range(80)]
    text = "\n".join(lines) + "\n"
    (root / "text.txt").write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes(text.replace("fox", "f\u00f6x").encode("latin-1"))
    return root


def _variant(root, tmp_path, change) -> str:
    """A copy of the base checkpoint, changed by ``change(directory)``."""
    directory = tmp_path / "variant"
    shutil.copytree(root / "base", directory)
    change(directory)
    return str(directory)


def _edit_config(**changes):
    """A change deleting (value ``None``) or setting config.json keys."""
    def change(directory):
        config = json.loads((directory / "config.json").read_text())
        for key, value in changes.items():
            config.pop(key) if value is None else config.__setitem__(key, value)
        (directory / "config.json").write_text(json.dumps(config))
    return change


def _edit_weight(name, index, value):
    def change(directory):
        tensors = load_file(directory / "model.safetensors")
        tensors[name][index] = value
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return change


def _compress_cli(capsys, checkpoint, out, mode, dataset):
    code = main(["compress", str(checkpoint), "-o", str(out), mode, "--dataset", str(dataset), *SMALL_RUN])
    return code, capsys.readouterr().err


def _the_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("optimum-a3 compress: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no partial dirs


def _assert_cli_refuses(capsys, checkpoint, out, mode, dataset, *expected):
    code, err = _compress_cli(capsys, checkpoint, out, mode, dataset)
    line = _the_error_line(err)
    assert code == 2, err
    for text in expected:
        assert text in line, line
    _assert_nothing_written(out)
    return line


def _streamed(root, checkpoint, out, dataset=None):
    config = A3Config(ratio=0.25, nsamples=2, seqlen=16, dataset=str(dataset or root / "text.txt"))
    return A3Compressor(config).compress_checkpoint(checkpoint, out, progress=False)


# ------------------------------------------------------------------------- non-UTF-8 calibration text
def test_a_non_utf8_text_file_is_refused_naming_it(root, tmp_path, capsys):
    with pytest.raises(DataSourceError, match=r"latin1\.txt is not UTF-8 text \(byte 0xf6 on line 1\)"):
        load_rows(str(root / "latin1.txt"))
    _assert_cli_refuses(capsys, root / "base", tmp_path / "out", "--low-memory", root / "latin1.txt",
                        "latin1.txt is not UTF-8 text")


# --------------------------------------------------------------------- damaged safetensors file
def _truncate(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _scribble_on_header(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"x" * 32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _scribble_on_header], ids=["truncated", "damaged-header"])
@pytest.mark.parametrize("mode", MODES)
def test_a_damaged_safetensors_file_is_refused_naming_it(root, tmp_path, capsys, damage, mode):
    checkpoint = _variant(root, tmp_path, damage)
    expected = f"{checkpoint}/model.safetensors is not a readable safetensors file"
    api_out = tmp_path / "api"
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        if mode == "--low-memory":
            _streamed(root, checkpoint, api_out)
        else:
            load_model_and_tokenizer(checkpoint)
    _assert_nothing_written(api_out)
    _assert_cli_refuses(capsys, checkpoint, tmp_path / "out", mode, root / "text.txt", expected)


# -------------------------------------------------------- config.json missing a key the weights need
# The keys whose transformers default does not fit this checkpoint, and what they break (measured): a size
# mismatch traceback, a config transformers refuses, or silently random weights (30 extra layers, lm_head).
BREAKING_KEYS = {
    "model_type": "has no 'model_type'",
    "hidden_size": "config.json has no 'hidden_size' (transformers assumed 4096)",
    "num_attention_heads": "config.json has no 'num_attention_heads' (transformers assumed 32)",
    "num_key_value_heads": "config.json has no 'num_key_value_heads' (transformers assumed 4)",
    "head_dim": "config.json has no 'head_dim' (transformers assumed 12)",
    "intermediate_size": "config.json has no 'intermediate_size' (transformers assumed 11008)",
    "num_hidden_layers": "config.json has no 'num_hidden_layers' (transformers assumed 32)",
    "vocab_size": "config.json has no 'vocab_size' (transformers assumed 32000)",
    "tie_word_embeddings": "config.json has no 'tie_word_embeddings' (transformers assumed False)",
}


@pytest.mark.parametrize("key", list(BREAKING_KEYS))
def test_a_config_missing_a_key_the_weights_need_is_refused_naming_it(root, tmp_path, capsys, key):
    checkpoint = _variant(root, tmp_path, _edit_config(**{key: None}))
    expected = (f"{checkpoint}/config.json", BREAKING_KEYS[key])
    with pytest.raises(ModelLoadError) as in_memory:
        load_model_and_tokenizer(checkpoint)
    with pytest.raises(ModelLoadError) as streamed:
        _streamed(root, checkpoint, tmp_path / "api")
    for error in (in_memory, streamed):
        assert all(text in str(error.value) for text in expected), error.value
    _assert_nothing_written(tmp_path / "api")
    for mode in MODES:
        _assert_cli_refuses(capsys, checkpoint, tmp_path / "out", mode, root / "text.txt", *expected)


def test_keys_whose_default_fits_the_weights_may_be_missing(tmp_path):
    """Plain MHA needs no num_key_value_heads, head_dim = hidden_size / heads no head_dim, untied
    embeddings no tie_word_embeddings (Llama's default is False): such configs exist and still load."""
    directory = tmp_path / "mha"
    tiny_llama(num_kv_heads=4, head_dim=12, tie=False).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    _edit_config(num_key_value_heads=None, head_dim=None, tie_word_embeddings=None)(directory)
    model, _ = load_model_and_tokenizer(str(directory))
    assert model.config.num_key_value_heads == 4 and model.config.head_dim == 12
    empty_model(str(directory), torch.float32)  # the streaming path's check


# ------------------------------------------------------------------------------- missing tokenizer
@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_without_tokenizer_files_is_refused_naming_it(root, tmp_path, capsys, mode):
    def remove_tokenizer(directory):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).unlink()

    checkpoint = _variant(root, tmp_path, remove_tokenizer)
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        if mode == "--low-memory":
            _streamed(root, checkpoint, tmp_path / "api")
        else:
            load_model_and_tokenizer(checkpoint)
    _assert_cli_refuses(capsys, checkpoint, tmp_path / "out", mode, root / "text.txt", f"{checkpoint} has no tokenizer")


# ------------------------------------------------------------------------------ NaN / Inf weights
V_PROJ = "model.layers.1.self_attn.v_proj.weight"


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_weight_is_named_when_the_layer_is_read(root, tmp_path, capsys, mode):
    """Before: a failed eigendecomposition (or non-finite statistics) deep in the solver, naming no weight."""
    checkpoint = _variant(root, tmp_path, _edit_weight(V_PROJ, (3, 4), float("nan")))
    expected = f"{V_PROJ} has NaN values (1 of 1,536)"
    with pytest.raises(NonFiniteWeightsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        if mode == "--low-memory":
            _streamed(root, checkpoint, tmp_path / "api")
        else:
            model, tokenizer = load_model_and_tokenizer(checkpoint)
            A3Compressor(A3Config(ratio=0.25, nsamples=2, seqlen=16, dataset=str(root / "text.txt"))).compress(
                model, tokenizer, progress=False)
    _assert_cli_refuses(capsys, checkpoint, tmp_path / "out", mode, root / "text.txt", expected)


# A row calibration never looks up (id 127 is "{", absent from the text): it used to be copied silently.
UNTOUCHED_EMBEDDING_ROW = ("model.embed_tokens.weight", (127, 4), float("nan"))
FINAL_NORM_INF = ("model.norm.weight", (0,), float("inf"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", [UNTOUCHED_EMBEDDING_ROW, FINAL_NORM_INF], ids=["nan-embedding-row", "inf-norm"])
def test_non_finite_weights_outside_the_layers_are_refused_naming_them(root, tmp_path, capsys, mode, damage):
    name, index, value = damage
    checkpoint = _variant(root, tmp_path, _edit_weight(name, index, value))
    kind = "NaN" if value != value else "Inf"
    with pytest.raises(NonFiniteWeightsError, match=f"{name} has {kind} values"):
        _streamed(root, checkpoint, tmp_path / "api")
    _assert_nothing_written(tmp_path / "api")
    _assert_cli_refuses(capsys, checkpoint, tmp_path / "out", mode, root / "text.txt", f"{name} has {kind} values")


def test_save_refuses_a_model_with_non_finite_weights_and_writes_nothing(tmp_path):
    compressor = A3Compressor(A3Config(ratio=0.25))
    small = compressor.compress(tiny_llama(), calibration_ids=torch.randint(3, 128, (2, 16)), progress=False)
    with torch.no_grad():
        small.model.embed_tokens.weight[5, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"model.embed_tokens.weight has Inf values \(1 of 6,144\)"):
        compressor.save(small, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_the_shard_writer_refuses_a_non_finite_tensor_by_name(tmp_path):
    writer = ShardWriter(str(tmp_path))
    with pytest.raises(NonFiniteWeightsError, match="model.layers.0.mlp.down_proj.weight has NaN values"):
        writer.add({"model.layers.0.mlp.down_proj.weight": torch.tensor([[1.0, float("nan")]])})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- A3Config value types
@pytest.mark.parametrize("kwargs,message", [
    ({"ratio": "0.2"}, "ratio must be a number, got the string '0.2'"),
    ({"ratio": True}, "ratio must be a number, got True (bool)"),
    ({"ratio": float("nan")}, "ratio must be a finite number"),
    ({"ratio": 0.2, "nsamples": 2.5}, "nsamples must be an integer, got 2.5"),
    ({"ratio": 0.2, "nsamples": "4"}, "nsamples must be an integer, got the string '4'"),
    ({"ratio": 0.2, "nsamples": True}, "nsamples must be an integer, got True (bool)"),
    ({"ratio": 0.2, "seqlen": 16.5}, "seqlen must be an integer, got 16.5"),
    ({"ratio": 0.2, "batch_size": "2"}, "batch_size must be an integer"),
    ({"ratio": 0.2, "seed": 0.5}, "seed must be an integer, got 0.5"),
    ({"ratio": 0.2, "eig_floor": "1e-9"}, "eig_floor must be a number"),
    ({"ratio": 0.2, "refit_damping": float("inf")}, "refit_damping must be a finite number"),
    ({"ratio": 0.2, "refit_damping": -1.0}, "refit_damping must be >= 0"),
    ({"head_dim_qk": 8.5, "head_dim_vo": 8, "intermediate_size": 8}, "head_dim_qk must be an integer, got 8.5"),
    ({"head_dim_qk": [8, "8"], "head_dim_vo": 8, "intermediate_size": 8}, "head_dim_qk must be an integer"),
    ({"head_dim_qk": 8, "head_dim_vo": 8, "intermediate_size": True}, "intermediate_size must be an integer"),
    ({"ratio": 0.2, "mlp_refit": "yes"}, "mlp_refit must be True or False"),
])
def test_config_values_of_the_wrong_type_are_refused_at_once(kwargs, message):
    with pytest.raises(A3ConfigError) as error:
        A3Config(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_numpy_numbers_are_stored_as_the_plain_numbers_they_print_as():
    config = A3Config(ratio=np.float32(0.2), nsamples=np.int64(4), seqlen=16.0, seed=np.int32(3),
                      eig_floor=np.float64(1e-9), head_dim_qk=[np.int64(8), 8], head_dim_vo=(8, 8),
                      mlp_refit=np.bool_(False))
    assert (config.ratio, config.nsamples, config.seqlen, config.seed, config.eig_floor) == (0.2, 4, 16, 3, 1e-9)
    assert [type(v) for v in (config.ratio, config.nsamples, config.seqlen, config.seed)] == [float, int, int, int]
    assert config.head_dim_qk == [8, 8] and type(config.head_dim_qk[0]) is int and config.head_dim_vo == [8, 8]
    assert config.mlp_refit is False
    assert json.loads(json.dumps(config.to_dict()))["ratio"] == 0.2


def test_a_numpy_ratio_compresses_and_saves_a_plain_json_record(tmp_path):
    """Before: accepted, compressed, then the save failed (float32 is not JSON serialisable)."""
    compressor = A3Compressor(A3Config(ratio=np.float32(0.25), nsamples=np.int64(2), seqlen=np.int64(16)))
    small = compressor.compress(tiny_llama(), calibration_ids=torch.randint(3, 128, (2, 16)), progress=False)
    compressor.save(small, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "config.json").read_text())["a3_compression"]
    assert record["ratio"] == 0.25 and record["a3_config"]["nsamples"] == 2


# ------------------------------------------------- streaming: tensors the config does not describe
@pytest.mark.parametrize("mode", MODES)
def test_a_config_with_fewer_layers_than_the_shards_hold_is_refused(root, tmp_path, capsys, mode):
    """Before: streaming compressed the first layer and dropped the second without a word."""
    checkpoint = _variant(root, tmp_path, _edit_config(num_hidden_layers=1))
    expected = f"{checkpoint}/config.json does not describe the weights: the checkpoint holds 2 decoder layers, " \
               "config.json describes 1 (num_hidden_layers)"
    with pytest.raises(ModelLoadError) as error:
        _streamed(root, checkpoint, tmp_path / "api")
    assert str(error.value) == expected
    _assert_nothing_written(tmp_path / "api")
    line = _assert_cli_refuses(capsys, checkpoint, tmp_path / "out", mode, root / "text.txt")
    assert line == f"optimum-a3 compress: error: {expected}"
