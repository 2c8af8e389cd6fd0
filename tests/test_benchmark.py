"""examples/benchmark.py end to end on a tiny model (seconds): every phase, the table, the plot, --report-only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from optimum_a3.calibration.text import load_rows
from optimum_a3.integrations.evaluation import perplexity, tokenize_rows
from tiny_models import tiny_llama, tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"
WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly vex a jovial king".split()


def run_script(*args, cwd):
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def tiny_model_and_text(tmp_path):
    """A saved tiny Llama with its tokenizer, and a text file to calibrate, evaluate and train on."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(10)) for i in range(60)))
    return base, text


def test_benchmark_measures_every_model_in_one_run(tmp_path):
    base, text = tiny_model_and_text(tmp_path)
    out = tmp_path / "out"
    run_script("--model", base, "--ratios", "0.25", "--methods", "a3", "a3-default", "svd", "svd-llm",
               "--calibration", text, "--nsamples", 4, "--seqlen", 32, "--eval-source", text, "--eval-seqlen", 32,
               "--eval-windows", 3, "--heldout-source", text, "--heldout-windows", 2,
               "--prefill-batch", 2, "--prefill-seqlen", 16, "--decode-tokens", 4,
               "--repeats", 2, "--out", out, cwd=tmp_path)

    rows = {(r["method"], r["ratio"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == [("dense", 0.0), ("a3", 0.25), ("a3-default", 0.25), ("svd", 0.25), ("svd-llm", 0.25)]
    dense = rows["dense", 0.0]
    # The dense figure is the library's perplexity on the same windows.
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = tokenize_rows(load_rows(str(text)), tiny_tokenizer())
    assert dense["ppl"] == pytest.approx(perplexity(model, ids, seqlen=32, max_windows=3, progress=False).ppl,
                                         rel=1e-6)
    assert dense["heldout_ppl"] == pytest.approx(
        perplexity(model, ids, seqlen=32, max_windows=2, progress=False).ppl, rel=1e-6)
    for row in rows.values():
        assert row["eval_windows"] == 3 and row["ppl"] > 1
        assert row["heldout_windows"] == 2 and row["heldout_ppl"] > 1
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    # Each compression that ran a calibration forward is timed against its own reference forward.
    references = set()
    for key in [("a3", 0.25), ("a3-default", 0.25), ("svd-llm", 0.25)]:
        row = rows[key]
        assert row["calib_forward_s"] > 0
        assert row["compress_over_calib_forward"] == pytest.approx(row["compress_s"] / row["calib_forward_s"])
        assert 0 < row["calib_forward_share"] <= 1
        references.add(row["calib_forward_s"])
    assert len(references) == 3  # measured anew before each of them, not once for the run
    # Same budget; A3 shrinks the KV cache, the two-factor baselines do not.
    assert rows["a3", 0.25]["decoder_linear_params"] < 0.8 * dense["decoder_linear_params"]
    assert rows["svd", 0.25]["decoder_linear_params"] < 0.8 * dense["decoder_linear_params"]
    assert rows["a3", 0.25]["kv_bytes_per_token"] < dense["kv_bytes_per_token"] == rows["svd", 0.25]["kv_bytes_per_token"]

    table = (out / "results.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(rows)
    header = table.splitlines()[2].split(" | ")
    assert header[2:4] == ["WikiText-2 ppl", "held-out ppl"]
    dense_cells = next(line for line in table.splitlines() if line.startswith("| dense |")).split(" | ")
    assert dense_cells[3] == f"{dense['heldout_ppl']:.2f}" and len(dense_cells) == len(header)
    assert (out / "ppl_vs_ratio.png").stat().st_size > 0
    # --report-only rebuilds the same table from results.json.
    (out / "results.md").unlink()
    run_script("--report-only", "--out", out, cwd=tmp_path)
    assert (out / "results.md").read_text() == table

    # A run cut off during the evaluation phase: --report-only tabulates what it has, into the --out given.
    saved = json.loads((out / "results.json").read_text())
    for row in saved["rows"]:
        for key in ("ppl", "eval_windows", "heldout_ppl", "heldout_windows", "decoder_linear_params", "total_params", "checkpoint_bytes",
                    "kv_bytes_per_token"):
            row.pop(key)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.json").write_text(json.dumps(saved))
    run_script("--report-only", "--out", cut, cwd=tmp_path)
    partial = (cut / "results.md").read_text()
    assert "on no windows" in partial and len([line for line in partial.splitlines() if line.startswith("| a3 |")]) == 1
    assert not (cut / "ppl_vs_ratio.png").exists()
    assert (out / "results.md").read_text() == table  # the original run's report is untouched


def test_benchmark_adds_a_distilled_row_per_a3_model(tmp_path):
    base, text = tiny_model_and_text(tmp_path)
    out = tmp_path / "out"
    run_script("--model", base, "--ratios", "0.25", "--methods", "a3", "--calibration", text, "--nsamples", 4,
               "--seqlen", 32, "--eval-source", text, "--eval-seqlen", 32, "--eval-windows", 3,
               "--heldout-source", "none", "--prefill-batch", 1, "--prefill-seqlen", 8, "--decode-tokens", 2,
               "--repeats", 1, "--recover-steps", 3, "--recover-dataset", text, "--recover-seqlen", 16,
               "--recover-batch-size", 2, "--out", out, cwd=tmp_path)

    rows = {(r["method"], r["ratio"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == [("dense", 0.0), ("a3", 0.25), ("a3+kd", 0.25)]
    a3, kd = rows["a3", 0.25], rows["a3+kd", 0.25]
    assert kd["recover_s"] > 0 and kd["compress_s"] is None
    assert kd["recovery"]["steps"] == 3 and kd["recovery"]["objective"] == "distillation"
    assert kd["recovery"]["method"] == "weights"
    assert kd["recovery"]["seqlen"] == 16 and kd["recovery"]["batch_size"] == 2
    # Same dims, other weights.
    assert kd["decoder_linear_params"] == a3["decoder_linear_params"]
    assert kd["kv_bytes_per_token"] == a3["kv_bytes_per_token"]
    assert kd["ppl"] != a3["ppl"]
    table = (out / "results.md").read_text()
    assert "`+kd` rows: the A3 weights distilled from the dense model for 3 steps of 2 x 16 tokens" in table
    assert len([line for line in table.splitlines() if line.startswith("| a3+kd | 0.2 |")]) == 1
