"""The real offline SmolLM2-135M-Instruct compressed by 20%, the paper's A3 and the library default (through the
quick start's own command), each bounded tightly against a perplexity measured with exactly these settings.

README's Results use 32 x 2048 calibration tokens and the first 40 WikiText-2 windows (about a quarter of an hour
for these three models on 2 cores); CI cannot afford that. These tests use the same model, ratio, calibration
source and seed and the same protocol (WikiText-2 test split, 2048-token windows from the start), but 8 x 512
calibration tokens and the first 4 windows; their figures (MEASURED, measured as its comment says) are in README's
Results too. Parameter and KV-cache counts do not depend on the calibration: they are README's table's, exactly.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offline_assets import ROOT, require_demo_assets, require_wikitext2_test_file
from optimum_a3 import A3Compressor, A3Config
from optimum_a3.math.budget import decoder_linear_params, kv_cache_bytes_per_token, total_params
from optimum_a3.integrations.evaluation import perplexity, tokenize_rows, wikitext2_test_rows

pytestmark = pytest.mark.slow

RATIO, NSAMPLES, SEQLEN, SEED, EVAL_SEQLEN, EVAL_WINDOWS = 0.2, 8, 512, 0, 2048, 4
# WikiText-2 perplexity on the first 4 windows of 2048 tokens, after calibrating on 8 x 512 tokens of
# wikipedia-offline (seed 0). Measured 2026-12-02 on the project's 2-core x86_64 CPU machine (23 GB RAM), torch
# 2.13.0+cpu, Python 3.11.7, by `python tests/test_smollm2.py` (measure() below: the same calls as the tests; 2
# threads) and by the same calls with torch.set_num_threads(1): dense 23.82644665 both, paper 52.34878359 /
# 52.34878367, default 49.37060457 / 49.37060325; the quick start's command (below) gave the same to 4 decimals.
# README, at 32 x 2048 calibration tokens and 40 windows: 20.15 / 49.22 / 44.14. The default was re-measured on
# 2026-12-03 when it gained the mixed allocation (128 probe tokens): 42.73797619 (1 thread); with 256 probe
# tokens it had been 43.78007892 (2 threads) / 43.78007678 (1 thread); dense and paper unchanged to 6 digits.
# Re-measured the same day when the default went to 64 probe tokens and gained the down_proj refit on every 4th
# token (which these 4,096 calibration tokens are too few for: it is skipped here, with a warning): 41.38176862
# (2 threads, measure() and the quick start's command alike); paper 52.34878317. The bound is 1%: the thread count moved the figures by 1e-7 relative; the default is 18% below the paper here, so a
# default that quietly became the paper or lost its mixed allocation (49.37, sequential calibration alone), or
# any change of that size to a solver, the calibration or the evaluation, fails.
MEASURED = {"dense": 23.8264, "paper": 52.3488, "default": 41.3818}
TOLERANCE = 0.01
# README's Results table for SmolLM2-135M: (decoder linear params, total params, KV bytes per token) of the
# uniform dims; the default's mixed allocation keeps the parameter count and moves some into attention (its
# KV cache: measured with this module's calibration).
README_SIZES = {"dense": (106_168_320, 134_515_008, 46_080), RATIO: (85_069_440, 113_416_128, 37_080)}
DEFAULT_SIZES = (85_069_440, 113_416_128, 45_996)  # 64 probe tokens (128 gave 44,844)


def _quickstart_command() -> list[str]:
    """The compression command of examples/quickstart.sh (the line after its set-up), split like the shell."""
    text = (ROOT / "examples" / "quickstart.sh").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith("optimum-a3 compress"))
    return shlex.split(line)


@pytest.fixture(scope="module")
def smollm2():
    require_demo_assets()
    from optimum_a3.checkpoint.loading import load_model_and_tokenizer

    torch.manual_seed(0)
    return load_model_and_tokenizer("smollm2-offline")


def _wikitext2_ids(tokenizer) -> torch.Tensor:
    return tokenize_rows(wikitext2_test_rows(str(require_wikitext2_test_file())), tokenizer)


def _ppl(model, ids) -> float:
    return perplexity(model, ids, seqlen=EVAL_SEQLEN, max_windows=EVAL_WINDOWS, progress=False).ppl


def _compress(model, tokenizer, method):
    config = A3Config(ratio=RATIO, nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED, method=method)
    return A3Compressor(config).compress(model, tokenizer, progress=False)


def _sizes(model) -> tuple[int, int, int]:
    return decoder_linear_params(model), total_params(model), kv_cache_bytes_per_token(model)


def test_paper_method_matches_the_measured_perplexity(smollm2):
    model, tokenizer = smollm2
    small = _compress(model, tokenizer, "paper")
    assert _sizes(model) == README_SIZES["dense"] and _sizes(small) == README_SIZES[RATIO]
    ppl = _ppl(small, _wikitext2_ids(tokenizer))
    print(f"WikiText-2 ppl, A3 (paper) at {RATIO:.0%}: {ppl:.4f} (measured {MEASURED['paper']})")
    assert ppl == pytest.approx(MEASURED["paper"], rel=TOLERANCE)


def test_quickstart_command_gives_the_measured_dense_and_default_perplexities(tmp_path):
    """examples/quickstart.sh's own compression command (the library default method), with the calibration and
    evaluation cut to this module's settings through its "$@" (argparse: the last value wins), run like the
    script: the installed console script, from the project root (where "wikitext2" is the shared file)."""
    require_demo_assets()
    require_wikitext2_test_file()
    command = _quickstart_command()
    assert command[-1] == "$@" and "--method" not in command  # the default method
    overrides = ["--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--eval-windows", str(EVAL_WINDOWS),
                 "--eval-seqlen", str(EVAL_SEQLEN), "--seed", str(SEED), "--output", str(tmp_path / "out")]
    script = Path(sys.executable).with_name(command[0])  # the installed console script
    assert script.is_file(), script
    proc = subprocess.run([str(script), *command[1:-1], *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("perplexity before (wikitext2): ") for line in lines), proc.stdout
    assert any(line.startswith("perplexity after  (wikitext2): ") for line in lines), proc.stdout
    summary = json.loads("\n".join(lines[next(i for i, line in enumerate(lines) if line == "{"):]))
    print(f"WikiText-2 ppl: dense {summary['ppl_before']:.4f}, default at {RATIO:.0%} {summary['ppl_after']:.4f} "
          f"(measured {MEASURED['dense']}, {MEASURED['default']})")
    assert summary["ppl_before"] == pytest.approx(MEASURED["dense"], rel=TOLERANCE)
    assert summary["ppl_after"] == pytest.approx(MEASURED["default"], rel=TOLERANCE)
    for i, key in enumerate(("decoder_linear_params", "total_params", "kv_cache_bytes_per_token")):
        assert summary[key] == [README_SIZES["dense"][i], DEFAULT_SIZES[i]], key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    record = config["a3_compression"]
    assert record["preset"] == "default" and record["sequential"] is True and record["ratio"] == RATIO
    assert record["allocation"] == "mixed"
    assert record["calibration"] == {"dataset": "wikipedia-offline", "nsamples": NSAMPLES, "seqlen": SEQLEN,
                                     "tokens": NSAMPLES * SEQLEN, "seed": SEED}


def measure() -> dict[str, float]:
    """Re-measure MEASURED: ``python tests/test_smollm2.py`` (minutes; print the figures, change nothing)."""
    from optimum_a3.checkpoint.loading import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("smollm2-offline")
    ids = _wikitext2_ids(tokenizer)
    figures = {"dense": _ppl(model, ids)}
    for method in ("paper", "default"):
        figures[method] = _ppl(_compress(model, tokenizer, method), ids)
    return figures


if __name__ == "__main__":
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, **measure()}))
