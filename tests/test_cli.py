"""``optimum-a3 compress | eval | push``: happy paths on a tiny model and bad input (exit 2, one-line reason)."""

import json
import os

import pytest
import torch
import yaml

from optimum_a3.cli import build_parser, main
from hub_server import FakeHub, patch_client
from tiny_models import tiny_llama, tiny_tokenizer

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly vex a jovial king".split()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, its tokenizer next to it, and a small calibration text file."""
    root = tmp_path_factory.mktemp("cli")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" {i}." for i in range(120)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def compressed_dir(base_dir):
    """``optimum-a3 compress`` run once (happy path), with calibration and evaluation options; uniform dims: the
    MLP weights (72 x 48 values) split into hqq's groups of 64 (the quantize tests), which a mixed width need not."""
    out = base_dir / "out"
    text = str(base_dir / "text.txt")
    code = main(["compress", str(base_dir / "base"), "--ratio", "0.25", "--output", str(out), "--dataset", text,
                 "--nsamples", "4", "--seqlen", "32", "--eval", text, "--eval-seqlen", "32", "--eval-windows", "2",
                 "--allocation", "uniform"])
    assert code == 0
    return out


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, command: str, match: str):
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith(f"optimum-a3 {command}: error: ")]
    assert len(error_lines) == 1, err
    assert match in error_lines[0], error_lines[0]


def test_compress_saves_a_checkpoint_with_its_record(compressed_dir):
    files = set(os.listdir(compressed_dir))
    assert {"model.safetensors", "config.json", "modeling_a3_llama.py", "tokenizer.json"} <= files
    record = json.loads((compressed_dir / "config.json").read_text())["a3_compression"]
    assert record["ratio"] == 0.25
    assert record["calibration"]["nsamples"] == 4 and record["calibration"]["seqlen"] == 32
    assert record["calibration"]["dataset"].endswith("text.txt")
    ev = record["evaluation"]
    assert ev["seqlen"] == 32 and ev["max_windows"] == 2 and ev["ppl_dense"] > 1 and ev["ppl_compressed"] > 1
    dense, small = record["sizes"]["decoder_linear_params"]
    assert small == pytest.approx(0.75 * dense, rel=0.02)


def test_eval_reports_perplexity(compressed_dir, base_dir, capsys):
    code, out, err = run(capsys, ["eval", str(compressed_dir), "--source", str(base_dir / "text.txt"),
                                  "--eval-seqlen", "32", "--eval-windows", "2"])
    assert code == 0, err
    result = json.loads(out)
    record = json.loads((compressed_dir / "config.json").read_text())["a3_compression"]
    assert result["ppl"] == pytest.approx(record["evaluation"]["ppl_compressed"], rel=1e-5)


def test_push_uploads_the_checkpoint_with_a_card(compressed_dir, tmp_path, monkeypatch, capsys):
    with FakeHub(lifetime=600) as hub:
        patch_client(monkeypatch, hub, str(tmp_path))
        monkeypatch.setenv("HF_TOKEN", hub.token)  # the token from the environment, as users do
        local_card = (compressed_dir / "README.md").read_text()  # save() writes the card
        code, out, err = run(capsys, ["push", str(compressed_dir), "a3-tester/cli-tiny", "--private",
                                      "--commit-message", "first upload"])
        assert code == 0, err
        assert json.loads(out)["commit"] == hub.repos["a3-tester/cli-tiny"].refs["main"]
        assert hub.repos["a3-tester/cli-tiny"].private
        assert hub.repos["a3-tester/cli-tiny"].commits[-1].summary == "first upload"
        files = hub.files("a3-tester/cli-tiny")
        assert (compressed_dir / "README.md").read_text() == local_card  # the local checkpoint is not modified
        card = files["README.md"].decode()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert {"a3", "low-rank"} <= set(meta["tags"]) and meta["metrics"] == ["perplexity"]
        assert "| Base (dense) |" in card and "Perplexity on" in card  # the recorded evaluation is shown
        assert "not recorded" not in card  # CLI runs record the base sizes

        code, _, err = run(capsys, ["push", str(compressed_dir), "a3-tester/other", "--token", "hf_wrong"])
        assert code == 2
        assert_one_line_error(err, "push", "rejected the token (HTTP 401")
        assert "a3-tester/other" not in hub.repos


def test_compress_push_to_hub_checks_the_token_before_compressing(base_dir, tmp_path, monkeypatch, capsys):
    with FakeHub(lifetime=600) as hub:
        patch_client(monkeypatch, hub, str(tmp_path))
        out = tmp_path / "never"
        code, _, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(out),
                                    "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                    "--push-to-hub", "a3-tester/x", "--token", "hf_wrong"])
        assert code == 2
        assert_one_line_error(err, "compress", "rejected the token")
        assert not out.exists() and hub.repos == {}

        code, stdout, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.5", "-o", str(out),
                                         "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                         "--push-to-hub", "a3-tester/half", "--token", hub.token])
        assert code == 0, err
        assert json.loads(stdout)["hub"]["repo_id"] == "a3-tester/half"
        assert "config.json" in hub.files("a3-tester/half") and (out / "config.json").is_file()


def test_low_memory_compress_with_stats_cache(base_dir, tmp_path, capsys):
    """A safetensors directory is streamed layer by layer; the second ratio reuses the cached statistics."""
    common = [str(base_dir / "base"), "--method", "paper", "--dataset", str(base_dir / "text.txt"), "--nsamples", "4",
              "--seqlen", "32", "--stats-cache", str(tmp_path / "cache")]
    results = []
    for ratio in ("0.25", "0.5"):
        code, out, err = run(capsys, ["compress", *common, "--ratio", ratio, "-o", str(tmp_path / ratio)])
        assert code == 0, err
        results.append(json.loads(out))
    assert [r["low_memory"] for r in results] == [True, True]
    assert [r["stats_cache_hit"] for r in results] == [False, True]
    dense, small = results[1]["decoder_linear_params"]
    assert small == pytest.approx(0.5 * dense, rel=0.03)
    assert json.loads((tmp_path / "0.5" / "config.json").read_text())["head_dim_vo"] == 8


def test_low_memory_sequential_compress_without_holding_the_mlp_intermediate(base_dir, tmp_path, capsys):
    out = tmp_path / "lean"
    # Streamed, the default method's mixed allocation (it probes the whole model) gives way to uniform dims.
    with pytest.warns(UserWarning, match="uses uniform dims instead of its mixed allocation"):
        code, stdout, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(out),
                                         "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                         "--low-memory", "--no-hold-mlp-intermediate"])
    assert code == 0, err
    assert json.loads(stdout)["low_memory"] is True
    record = json.loads((out / "config.json").read_text())["a3_compression"]
    assert record["sequential"] is True and record["a3_config"]["hold_mlp_intermediate"] is False
    assert record["allocation"] == "uniform"


def test_default_method_loaded_whole_allocates_mixed_dims(base_dir, tmp_path, capsys):
    out = tmp_path / "mixed"
    code, stdout, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(out),
                                     "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                     "--no-low-memory", "--allocation-windows", "2", "--sensitivity-tokens", "16"])
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())["a3_compression"]
    assert record["allocation"] == "mixed" and record["preset"] == "default"
    assert (record["a3_config"]["allocation_windows"], record["a3_config"]["sensitivity_tokens"]) == (2, 16)


def test_mixed_allocation_with_capped_kv_dims(base_dir, tmp_path, capsys):
    out = tmp_path / "capped"
    code, _, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(out),
                                "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                "--allocation", "mixed", "--cap-kv-dims",
                                "--sensitivity-tokens", "32"])
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())["a3_compression"]
    assert record["allocation"] == "mixed" and record["a3_config"]["cap_kv_dims"] is True
    assert max(record["dims"]["head_dim_qk"]) <= 12 and max(record["dims"]["head_dim_vo"]) <= 12  # uniform: 12


def test_mixed_allocation_with_a_max_dim_factor(base_dir, tmp_path, capsys):
    out = tmp_path / "bounded"
    code, _, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(out),
                                "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                "--allocation", "mixed", "--max-dim-factor", "1.2", "--sensitivity-tokens", "32"])
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())["a3_compression"]
    assert record["a3_config"]["max_dim_factor"] == 1.2
    for name in ("head_dim_qk", "head_dim_vo"):
        assert all(10 <= d <= 14 for d in record["dims"][name]), (name, record["dims"][name])  # 12 / 1.2, 12 * 1.2
    code, _, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(tmp_path / "bad"),
                                "--allocation", "mixed", "--max-dim-factor", "0.5"])
    assert code == 2 and "max_dim_factor must be >= 1" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:  # argparse's usage error, like any malformed option
        main(["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(tmp_path / "bad"),
              "--allocation", "mixed", "--max-dim-factor", "wide"])
    assert exc.value.code == 2 and "expected a number or 'none'" in capsys.readouterr().err
    out = tmp_path / "unbounded"
    code, _, err = run(capsys, ["compress", str(base_dir / "base"), "--ratio", "0.25", "-o", str(out),
                                "--dataset", str(base_dir / "text.txt"), "--nsamples", "4", "--seqlen", "32",
                                "--allocation", "mixed", "--max-dim-factor", "none", "--sensitivity-tokens", "32"])
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["a3_compression"]["a3_config"]["max_dim_factor"] is None


def test_quantize_saves_a_reloadable_4bit_checkpoint(compressed_dir, base_dir, tmp_path, capsys):
    from optimum_a3.integrations.quantization import load_quantized, quantized_backend

    text = str(base_dir / "text.txt")
    code, out, err = run(capsys, ["quantize", str(compressed_dir), "-o", str(tmp_path / "q"), "--backend", "hqq",
                                  "--dtype", "float32", "--eval", text, "--eval-seqlen", "32", "--eval-windows", "2"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["backend"] == "hqq" and summary["bits"] == 4 and summary["ppl"] > 1
    reloaded = load_quantized(tmp_path / "q")
    assert quantized_backend(reloaded) == "hqq"
    assert reloaded.config.head_dim_vo == json.loads((compressed_dir / "config.json").read_text())["head_dim_vo"]

    # `eval` loads the quantized checkpoint with load_quantized (from_pretrained would re-initialise its
    # weights) and measures exactly what `quantize --eval` measured before saving.
    code, out, err = run(capsys, ["eval", str(tmp_path / "q"), "--source", text, "--eval-seqlen", "32",
                                  "--eval-windows", "2"])
    assert code == 0, err
    assert json.loads(out)["ppl"] == summary["ppl"]
    # The card says how to load it and shows the perplexity measured after quantization.
    card = (tmp_path / "q" / "README.md").read_text()
    usage = card.split("## Usage")[1].split("## Compression")[0]
    assert 'load_quantized("path/to/this/checkpoint")' in usage and "AutoModelForCausalLM" not in usage
    assert f"**{summary['ppl']:.3f}**" in card


def test_recover_fine_tunes_and_saves_a_plain_a3_checkpoint(compressed_dir, base_dir, tmp_path, capsys):
    text = str(base_dir / "text.txt")
    code, out, err = run(capsys, ["recover", str(compressed_dir), "-o", str(tmp_path / "r"), "--dataset", text,
                                  "--steps", "6", "--seqlen", "32", "--lr", "1e-2", "--eval", text,
                                  "--eval-seqlen", "32", "--eval-windows", "2"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["recovery"]["steps"] == 6 and summary["ppl_after"] < summary["ppl_before"]
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    before = json.loads((compressed_dir / "config.json").read_text())
    assert {k: config[k] for k in ("head_dim_qk", "head_dim_vo", "intermediate_size")} == \
        {k: before[k] for k in ("head_dim_qk", "head_dim_vo", "intermediate_size")}
    assert config["a3_compression"]["recovery"]["rank"] == 8


def test_recover_distills_the_weights_from_the_dense_model(compressed_dir, base_dir, tmp_path, capsys):
    text = str(base_dir / "text.txt")
    code, out, err = run(capsys, ["recover", str(compressed_dir), "-o", str(tmp_path / "r"), "--dataset", text,
                                  "--train", "weights", "--teacher", str(base_dir / "base"), "--temperature", "2",
                                  "--steps", "6", "--seqlen", "32", "--lr", "3e-3", "--eval", text,
                                  "--eval-seqlen", "32", "--eval-windows", "2"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ppl_after"] != summary["ppl_before"]
    record = json.loads((tmp_path / "r" / "config.json").read_text())["a3_compression"]["recovery"]
    from safetensors.torch import load_file

    before, after = load_file(compressed_dir / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, value in before.items():  # the projections were trained, the rest is as it was
        assert torch.equal(after[name], value) == ("_proj." not in name), name
    assert record["method"] == "weights" and record["objective"] == "distillation" and "rank" not in record
    assert record["teacher"] == str(base_dir / "base") and record["temperature"] == 2.0


@pytest.mark.parametrize("argv,command,match", [
    (["compress", "{base}", "--ratio", "1.5", "-o", "{tmp}/o"], "compress", "ratio must be in [0, 1)"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{busy}"], "compress", "is not empty: choose another directory or pass --overwrite"),
    (["compress", "{tmp}/no-such-model", "--ratio", "0.2", "-o", "{tmp}/o"], "compress", "no such file or directory"),
    (["compress", "{tmp}/missing.gguf", "--ratio", "0.2", "-o", "{tmp}/o"], "compress", "no such GGUF file"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{tmp}/o", "--dataset", "{tmp}/nothing.txt", "--seqlen", "32"],
     "compress", "unknown text source"),
    (["compress", "{tmp}/missing.gguf", "--ratio", "0.2", "-o", "{tmp}/o", "--low-memory"], "compress",
     "no such GGUF file"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{tmp}/o", "--low-memory", "--allocation", "mixed"], "compress",
     "add --allocation uniform or --sensitivity-tokens 0"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{tmp}/o", "--low-memory", "--method", "quality"], "compress",
     "which the mixed allocation probes"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{tmp}/o", "--allocation", "mixed", "--sensitivity-tokens", "-1"],
     "compress", "sensitivity_tokens must be >= 0"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{tmp}/o", "--low-memory", "--eval", "wikitext2"], "compress",
     "evaluate afterwards"),
    (["compress", "{base}", "--ratio", "0.2", "-o", "{tmp}/o", "--stats-cache", "{tmp}/c", "--seqlen", "32"],
     "compress", "sequential calibration cannot reuse statistics"),
    (["eval", "{tmp}/no-such-checkpoint"], "eval", "no such file or directory"),
    (["push", "{tmp}/no-such-checkpoint", "a3-tester/x"], "push", "is not a directory"),
    (["push", "{base}", "a3-tester/x"], "push", "no `a3_compression` record"),
    (["quantize", "{base}", "-o", "{tmp}/o", "--backend", "quanto", "--bits", "3"], "quantize", "supports bits in"),
    (["quantize", "{base}", "-o", "{busy}"], "quantize", "is not empty: choose another directory or pass --overwrite"),
    (["recover", "{base}", "-o", "{tmp}/o", "--steps", "2"], "recover", "expects an A3 model"),
    (["recover", "{tmp}/no-such-checkpoint", "-o", "{tmp}/o"], "recover", "no such file or directory"),
    (["recover", "{compressed}", "-o", "{tmp}/o", "--teacher", "{tmp}/no-such-teacher"], "recover",
     "no such file or directory"),
    (["recover", "{compressed}", "-o", "{tmp}/o", "--teacher", "{base}", "--temperature", "0", "--steps", "2"],
     "recover", "temperature must be a positive number"),
    # Bad settings are refused before the model is loaded (the checkpoint does not even exist).
    (["recover", "{tmp}/no-such-checkpoint", "-o", "{tmp}/o", "--steps", "0"], "recover",
     "steps must be an integer >= 1"),
    (["recover", "{tmp}/no-such-checkpoint", "-o", "{tmp}/o", "--batch-size", "0", "--train", "weights"], "recover",
     "batch_size must be an integer >= 1"),
])
def test_bad_input_exits_2_with_one_line(argv, command, match, base_dir, compressed_dir, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    argv = [a.format(base=base_dir / "base", tmp=tmp_path, busy=busy, compressed=compressed_dir) for a in argv]
    code, out, err = run(capsys, argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, command, match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["frobnicate"], [], ["compress", "model"], ["push", "dir"],
                                  ["compress", "m", "-o", "x", "--ratio", "lots"]])
def test_bad_syntax_exits_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: optimum-a3" in capsys.readouterr().err


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("compress", "eval", "push", "quantize", "recover"):
        assert command in text
    for sub in ("compress", "eval", "push", "quantize", "recover"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and f"optimum-a3 {sub}" in text
    help_text = build_parser().format_help()
    assert "trust_remote_code=True" in help_text and "HF_TOKEN" in help_text


def test_every_library_error_is_an_a3error_and_keeps_its_standard_base():
    """The CLI catches A3Error: each error the library raises on purpose must be one (and stay what it was)."""
    import importlib
    import inspect
    import pkgutil

    import optimum_a3
    from optimum_a3.errors import A3Error

    found = {}
    # Every module of every sub-package; the vLLM plugin imports vLLM, which lives in its own environment,
    # and __main__ runs the CLI.
    names = [info.name for info in pkgutil.walk_packages(optimum_a3.__path__, "optimum_a3.")
             if not info.name.startswith("optimum_a3.integrations.vllm") and info.name != "optimum_a3.__main__"]
    for name in names:
        module = importlib.import_module(name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception) and name.endswith("Error"):
                found[name] = cls
    assert len(found) >= 15, sorted(found)
    assert all(issubclass(cls, A3Error) for cls in found.values()), [n for n, c in found.items() if not issubclass(c, A3Error)]
    assert issubclass(found["OutputDirError"], FileExistsError) and issubclass(found["HubPushError"], RuntimeError)
    assert issubclass(found["A3ConfigError"], ValueError) and issubclass(found["NonFiniteStatisticsError"], RuntimeError)
