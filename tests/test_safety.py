"""Defects found by an adversarial pass (issue "Data loss, code execution and silent wrong results"):
user files are never destroyed, foreign code never runs without an explicit opt-in, and bad input
fails early with a one-line error (exit status 2 in the CLI)."""

import json
import os

import pytest

from optimum_a3 import A3Compressor, A3Config, A3ConfigError, OutputDirError
from optimum_a3.cli import main
from optimum_a3.checkpoint.loading import ModelLoadError, load_model_and_tokenizer
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly vex a jovial king".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama checkpoint with its tokenizer, and a small calibration text."""
    root = tmp_path_factory.mktemp("safety")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    lines = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) + f" {i}." for i in range(80)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return root


def _cli(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"optimum-a3 {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def scratch_cwd(tmp_path, monkeypatch):
    """A working directory holding a file and a sub-directory that must survive."""
    cwd = tmp_path / "scratch"
    (cwd / "sub").mkdir(parents=True)
    (cwd / "notes.txt").write_text("x")
    (cwd / "sub" / "keep.txt").write_text("y")
    monkeypatch.chdir(cwd)
    return cwd


def _assert_intact(cwd):
    assert sorted(os.listdir(cwd)) == ["notes.txt", "sub"]
    assert (cwd / "notes.txt").read_text() == "x" and (cwd / "sub" / "keep.txt").read_text() == "y"


# ------------------------------------------------------------------ critical 1: empty output path
COMPRESS = ["--ratio", "0.25", "--nsamples", "2", "--seqlen", "16"]


@pytest.mark.parametrize("streaming", ["--no-low-memory", "--low-memory"])
def test_compress_to_an_empty_output_path_is_refused_and_the_working_directory_survives(
        base, scratch_cwd, capsys, streaming):
    code, err = _cli(capsys, ["compress", base / "base", "-o", "", streaming, "--dataset", base / "text.txt",
                              *COMPRESS])
    assert code == 2
    assert "output path is empty" in _one_error_line(err, "compress")
    _assert_intact(scratch_cwd)


@pytest.mark.parametrize("command", ["quantize", "recover"])
def test_other_writers_refuse_an_empty_output_path(base, scratch_cwd, capsys, command):
    code, err = _cli(capsys, [command, base / "base", "-o", "", "--overwrite"])
    assert code == 2
    assert "output path is empty" in _one_error_line(err, command)
    _assert_intact(scratch_cwd)


def test_api_save_to_an_empty_path_raises_and_the_working_directory_survives(base, scratch_cwd):
    model = tiny_llama()
    compressor = A3Compressor(A3Config(ratio=0.25, method="paper"))
    small = compressor.compress(model, calibration_ids=random_token_windows(2, 16), progress=False)
    for path in ("", "  "):
        with pytest.raises(OutputDirError, match="output path is empty"):
            compressor.save(small, path, overwrite=True)
    with pytest.raises(OutputDirError, match="output path is empty"):
        compressor.compress_checkpoint(base / "base", "", calibration_ids=random_token_windows(2, 16),
                                       progress=False, overwrite=True)
    _assert_intact(scratch_cwd)


@pytest.mark.parametrize("output", [".", "..", "{cwd}"])
def test_the_working_directory_or_a_parent_is_never_replaced_even_with_overwrite(base, scratch_cwd, capsys, output):
    code, err = _cli(capsys, ["compress", base / "base", "-o", output.format(cwd=scratch_cwd), "--overwrite",
                              "--dataset", base / "text.txt", *COMPRESS])
    assert code == 2
    assert "current working directory" in _one_error_line(err, "compress")
    _assert_intact(scratch_cwd)


# ------------------------------------------------- critical 2: remote code only on explicit opt-in
REMOTE_CONFIG = '''
import pathlib
from transformers import LlamaConfig
pathlib.Path({marker!r}).write_text("remote code ran")

class ForeignConfig(LlamaConfig):
    model_type = "foreign_llama"
'''
REMOTE_MODEL = '''
import pathlib
from transformers import LlamaForCausalLM
from .configuration_foreign import ForeignConfig
pathlib.Path({marker!r}).write_text("remote code ran")

class ForeignForCausalLM(LlamaForCausalLM):
    config_class = ForeignConfig
'''


@pytest.fixture
def foreign_checkpoint(tmp_path):
    """A working tiny Llama checkpoint whose config.json maps to Python files that leave a marker when run."""
    directory = tmp_path / f"foreign_{os.getpid()}_{tmp_path.name}"  # a fresh dynamic-module name per test
    tiny_llama().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (directory / "configuration_foreign.py").write_text(REMOTE_CONFIG.format(marker=str(marker)))
    (directory / "modeling_foreign.py").write_text(REMOTE_MODEL.format(marker=str(marker)))
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="foreign_llama", architectures=["ForeignForCausalLM"], auto_map={
        "AutoConfig": "configuration_foreign.ForeignConfig",
        "AutoModelForCausalLM": "modeling_foreign.ForeignForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 20))
    return directory, marker


@pytest.mark.parametrize("command", ["eval", "quantize", "compress", "recover"])
def test_cli_never_runs_a_checkpoints_code_without_trust_remote_code(foreign_checkpoint, tmp_path, capsys,
                                                                      command):
    directory, marker = foreign_checkpoint
    argv = [command, directory]
    if command == "eval":
        argv += ["--source", directory.parent / "text.txt", "--eval-seqlen", "8", "--eval-windows", "1"]
    else:
        argv += ["-o", tmp_path / "out"]
    if command == "compress":
        argv += ["--dataset", directory.parent / "text.txt", *COMPRESS]
    code, err = _cli(capsys, argv)
    assert code == 2
    assert "--trust-remote-code" in _one_error_line(err, command)
    assert not marker.exists(), "the checkpoint's code ran without --trust-remote-code"
    assert not (tmp_path / "out").exists()


def test_api_loaders_refuse_remote_code_by_default(foreign_checkpoint, tmp_path):
    directory, marker = foreign_checkpoint
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_model_and_tokenizer(str(directory))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        A3Compressor(A3Config(ratio=0.25)).compress_checkpoint(directory, tmp_path / "out", progress=False,
                                                               calibration_ids=random_token_windows(2, 16))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_eval_runs_a_checkpoints_code_with_trust_remote_code(foreign_checkpoint, capsys):
    """The opt-in works: the same checkpoint is evaluated once the user asks for its code."""
    directory, marker = foreign_checkpoint
    code, err = _cli(capsys, ["eval", directory, "--trust-remote-code", "--source", directory.parent / "text.txt",
                              "--eval-seqlen", "8", "--eval-windows", "1"])
    assert code == 0, err
    assert marker.read_text() == "remote code ran"


def test_a3_checkpoints_load_without_trust_remote_code(base, tmp_path, capsys):
    """A3 checkpoints carry an auto_map too, but the installed package registers their classes."""
    out = tmp_path / "a3"
    code, err = _cli(capsys, ["compress", base / "base", "-o", out, "--dataset", base / "text.txt", *COMPRESS])
    assert code == 0, err
    assert "auto_map" in json.loads((out / "config.json").read_text())
    code, err = _cli(capsys, ["eval", out, "--source", base / "text.txt", "--eval-seqlen", "16", "--eval-windows", "1"])
    assert code == 0, err


# --------------------------------------------------- 4: the output never replaces the input model
def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def own_input(base, tmp_path):
    """A private copy of the base checkpoint (inside a parent that holds nothing else)."""
    import shutil

    directory = tmp_path / "parent" / "model"
    shutil.copytree(base / "base", directory)
    return directory


@pytest.mark.parametrize("where", ["itself", "its parent", "inside it"])
@pytest.mark.parametrize("command", ["compress", "quantize", "recover"])
def test_an_output_that_is_contains_or_lies_inside_the_input_is_refused(base, own_input, capsys, command, where):
    output = {"itself": own_input, "its parent": own_input.parent, "inside it": own_input / "out"}[where]
    before = _snapshot(own_input.parent)
    argv = [command, own_input, "-o", output, "--overwrite"]
    if command == "compress":
        argv += ["--dataset", base / "text.txt", *COMPRESS]
    code, err = _cli(capsys, argv)
    assert code == 2
    relation = {"itself": "is", "its parent": "contains", "inside it": "lies inside"}[where]
    assert f"{relation} the input {own_input}" in _one_error_line(err, command)
    assert _snapshot(own_input.parent) == before


@pytest.fixture(scope="module")
def hqq_model():
    """A tiny Llama quantized to 4 bits with hqq (once: hqq is slow on CPU)."""
    from optimum_a3.integrations.quantization import quantize_model

    return quantize_model(tiny_llama(hidden=64), backend="hqq", bits=4)


def test_api_saves_never_replace_the_model_they_were_loaded_from(own_input, hqq_model):
    compressor = A3Compressor(A3Config(ratio=0.25, method="paper"))
    ids = random_token_windows(2, 16)
    before = _snapshot(own_input)
    with pytest.raises(OutputDirError, match="is the input"):
        compressor.compress_checkpoint(own_input, own_input, calibration_ids=ids, progress=False, overwrite=True)
    model, tokenizer = load_model_and_tokenizer(str(own_input))
    small = compressor.compress(model, calibration_ids=ids, progress=False)
    with pytest.raises(OutputDirError, match="is the input"):
        compressor.save(small, own_input, tokenizer=tokenizer, overwrite=True)
    from optimum_a3.integrations.quantization import save_quantized

    hqq_model.config._name_or_path = str(own_input)  # as if quantized after loading it from there
    with pytest.raises(OutputDirError, match="contains the input"):
        save_quantized(hqq_model, own_input.parent, overwrite=True)
    assert _snapshot(own_input) == before


# ---------------------------------------------------------------------------------- 8: minor
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_get_the_permissions_of_a_plain_mkdir_under_the_umask(base, tmp_path, umask):
    old = os.umask(umask)
    try:
        compressor = A3Compressor(A3Config(ratio=0.25, method="paper"))
        ids = random_token_windows(2, 16)
        streamed = compressor.compress_checkpoint(base / "base", tmp_path / "streamed", calibration_ids=ids,
                                                  progress=False)
        small = compressor.compress(tiny_llama(), calibration_ids=ids, progress=False)
        in_memory = compressor.save(small, tmp_path / "in_memory", tokenizer=tiny_tokenizer())
    finally:
        os.umask(old)
    for directory in (streamed, in_memory):
        assert os.stat(directory).st_mode & 0o777 == 0o777 & ~umask
        modes = {name: os.stat(os.path.join(directory, name)).st_mode & 0o777 for name in os.listdir(directory)}
        assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_calibration_windows_longer_than_the_models_positions_are_refused(base, tmp_path, capsys):
    with pytest.raises(A3ConfigError, match="max_position_embeddings"):
        A3Compressor(A3Config(ratio=0.25)).compress(tiny_llama(), calibration_ids=random_token_windows(1, 257),
                                                    progress=False)
    code, err = _cli(capsys, ["compress", base / "base", "-o", tmp_path / "out", "--dataset", base / "text.txt",
                              "--ratio", "0.25", "--nsamples", "1", "--seqlen", "300"])
    assert code == 2
    assert "exceed the model's max_position_embeddings (256)" in _one_error_line(err, "compress")
    assert not (tmp_path / "out").exists()


def test_tokenizer_config_is_the_same_whether_loaded_offline_or_online(base, tmp_path):
    """Offline, transformers forces local_files_only=True and records it in tokenizer_config.json."""
    from transformers import AutoTokenizer

    compressor = A3Compressor(A3Config(ratio=0.25, method="paper"))
    small = compressor.compress(tiny_llama(), calibration_ids=random_token_windows(2, 16), progress=False)
    written = []
    for offline in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(base / "base", local_files_only=offline)
        out = compressor.save(small, tmp_path / f"offline-{offline}", tokenizer=tokenizer)
        written.append((tmp_path / f"offline-{offline}" / "tokenizer_config.json").read_bytes())
        assert "local_files_only" not in json.loads(written[-1])
        assert AutoTokenizer.from_pretrained(out)("the fox").input_ids == tokenizer("the fox").input_ids
    assert written[0] == written[1]


def test_an_unwritable_output_parent_is_refused_before_compressing(base, tmp_path, capsys, monkeypatch):
    import optimum_a3.checkpoint.saving as saving
    from optimum_a3.compressor import A3Compressor as Compressor

    def must_not_run(*args, **kwargs):
        raise AssertionError("compression started although the output cannot be written")

    monkeypatch.setattr(Compressor, "compress", must_not_run)
    monkeypatch.setattr(Compressor, "compress_checkpoint", must_not_run)
    (tmp_path / "a_file").write_text("x")
    code, err = _cli(capsys, ["compress", base / "base", "-o", tmp_path / "a_file" / "out", "--dataset",
                              base / "text.txt", *COMPRESS])
    assert code == 2 and "is a file, not a directory" in _one_error_line(err, "compress")
    # Root ignores permission bits, so the refusal of a read-only parent is shown through os.access.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(saving.os, "access", lambda path, mode: path != str(locked) and real_access(path, mode))
    code, err = _cli(capsys, ["compress", base / "base", "-o", locked / "new" / "out", "--no-low-memory",
                              "--dataset", base / "text.txt", *COMPRESS])
    assert code == 2 and f"no permission to create files in {locked}" in _one_error_line(err, "compress")


def test_a_damaged_hqq_checkpoint_fails_with_a_message_naming_the_file(tmp_path, hqq_model, capsys):
    from optimum_a3.integrations.quantization import QuantizationError, load_quantized, save_quantized

    out = save_quantized(hqq_model, tmp_path / "q")
    weights = os.path.join(out, "qmodel.pt")
    with open(weights, "rb") as f:
        head = f.read(4096)
    with open(weights, "wb") as f:  # truncated
        f.write(head)
    with pytest.raises(QuantizationError, match="cannot load the hqq checkpoint"):
        load_quantized(out)
    os.remove(weights)
    with pytest.raises(QuantizationError, match="qmodel.pt is missing"):
        load_quantized(out)
    code, err = _cli(capsys, ["eval", out, "--source", "wikitext2"])
    assert code == 2 and "qmodel.pt is missing" in _one_error_line(err, "eval")
