"""Perplexity protocol (GPTQ / SVD-LLM / A3): windows, tail dropping, batching, data loading."""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch
import offline_assets
from offline_assets import WIKITEXT2_TEST_SHA256, require_wikitext2_test_file
from tiny_models import random_token_windows, tiny_llama

from optimum_a3.calibration.text import DataSourceError, join_rows, load_rows
from optimum_a3.integrations.evaluation import (
    PerplexityResult,
    evaluate_perplexity,
    perplexity,
    tokenize_rows,
    wikitext2_test_rows,
)

SEQLEN = 32


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    # 5 full windows of random ids (vocab 128, as tiny_llama).
    return random_token_windows(1, 5 * SEQLEN, seed=1)[0]


def hand_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """Window-by-window reference: log_softmax, gather the next token, mean over all, exp."""
    n = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(n):
            window = ids[i * seqlen:(i + 1) * seqlen][None]
            logp = torch.log_softmax(model(input_ids=window).logits.double(), dim=-1)[0, :-1]
            nlls.append(-logp.gather(-1, window[0, 1:, None]).squeeze(-1))
    return math.exp(torch.cat(nlls).mean().item())


def test_matches_hand_computation(model, tokens):
    result = perplexity(model, tokens, seqlen=SEQLEN, progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.num_windows == 5
    assert result.num_tokens == 5 * (SEQLEN - 1)
    assert result.seqlen == SEQLEN
    assert result.ppl == pytest.approx(hand_perplexity(model, tokens, SEQLEN), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_tail_is_dropped(model, tokens):
    two_and_a_half = tokens[: 2 * SEQLEN + SEQLEN // 2]
    full = perplexity(model, tokens[: 2 * SEQLEN], seqlen=SEQLEN, progress=False)
    tailed = perplexity(model, two_and_a_half, seqlen=SEQLEN, progress=False)
    assert tailed.num_windows == 2
    assert tailed.ppl == full.ppl


def test_batch_size_invariance(model, tokens):
    one = perplexity(model, tokens, seqlen=SEQLEN, batch_size=1, progress=False)
    three = perplexity(model, tokens, seqlen=SEQLEN, batch_size=3, progress=False)  # 3 + a partial batch of 2
    assert three.num_windows == one.num_windows
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_max_windows(model, tokens):
    limited = perplexity(model, tokens, seqlen=SEQLEN, max_windows=2, progress=False)
    first_two = perplexity(model, tokens[: 2 * SEQLEN], seqlen=SEQLEN, progress=False)
    assert limited.num_windows == 2
    assert limited.ppl == first_two.ppl
    # More windows asked than available: all are used.
    assert perplexity(model, tokens, seqlen=SEQLEN, max_windows=99, progress=False).num_windows == 5


def test_errors(model, tokens):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokens[: SEQLEN - 1], seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(model, tokens, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, tokens, seqlen=SEQLEN, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, tokens, seqlen=SEQLEN, max_windows=0, progress=False)


def byte_tokenizer(model_max_length: int = 16):
    """A byte-level tokenizer built in memory (no downloads) that prepends BOS, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", model_max_length=model_max_length)


def test_tokenize_rows_joins_once_and_does_not_truncate(caplog):
    tokenizer = byte_tokenizer(model_max_length=16)
    rows = [" = Title = \n", "\n", " Some text , with 123 numbers .\n"]
    with caplog.at_level(logging.WARNING):
        ids = tokenize_rows(rows, tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    text = join_rows(rows)
    assert ids.numel() == 1 + len(text.encode("utf-8"))  # one BOS for the whole text, far over model_max_length
    assert ids[0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == text
    assert "longer than the specified maximum" not in caplog.text


def test_wikitext2_rows_from_file(tmp_path):
    content = " = Valkyria = \n\n Senjō no Valkyria 3 .\r\n\n last line without newline"
    path = tmp_path / "wiki.test.raw"
    path.write_text(content, encoding="utf-8", newline="")  # keep the CRLF as written
    rows = wikitext2_test_rows(str(path))
    with open(path, encoding="utf-8") as f:
        assert rows == f.read().splitlines(keepends=True)
    # Text mode turns CRLF into "\n", so a CRLF copy of the file gives the dataset's rows.
    assert rows == [" = Valkyria = \n", "\n", " Senjō no Valkyria 3 .\n", "\n", " last line without newline"]
    with pytest.raises(DataSourceError):
        wikitext2_test_rows(str(tmp_path / "missing.raw"))


def test_evaluate_perplexity_sources(tmp_path):
    tokenizer = byte_tokenizer()
    model = tiny_llama(vocab=len(tokenizer))
    rows = [f" row {i} : some words for the windows .\n" for i in range(12)]
    path = tmp_path / "wiki.test.raw"
    path.write_text("".join(rows), encoding="utf-8")
    expected = perplexity(model, tokenize_rows(rows, tokenizer), seqlen=SEQLEN, progress=False)
    from_list = evaluate_perplexity(model, tokenizer, rows, seqlen=SEQLEN, progress=False)
    from_wikitext_path = evaluate_perplexity(model, tokenizer, f"wikitext2:{path}", seqlen=SEQLEN, progress=False)
    assert from_list == expected
    assert from_wikitext_path == expected


def test_missing_wikitext2_file_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(offline_assets, "WIKITEXT2_TEST", tmp_path / "absent" / "wiki.test.raw")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must provide it"):
        require_wikitext2_test_file()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not present"):
        require_wikitext2_test_file()


def test_wikitext2_source_reads_the_shared_file_offline(monkeypatch):
    """``"wikitext2"`` (the CLI's and evaluate_perplexity's default) is the shared file read from the project root,
    as the quick start runs it: no download (the suite runs with HF_HUB_OFFLINE=1, so an attempt fails here)."""
    path = require_wikitext2_test_file()
    monkeypatch.chdir(offline_assets.ROOT)
    assert load_rows("wikitext2") == wikitext2_test_rows(str(path))


def test_local_wikitext2_file():
    path = require_wikitext2_test_file()
    # The split the README's figures were measured on, byte for byte (../shared/data/README.md).
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WIKITEXT2_TEST_SHA256
    rows = wikitext2_test_rows(str(path))
    with open(path, encoding="utf-8") as f:
        assert len(rows) == len(f.read().splitlines())
    assert all(row.endswith("\n") for row in rows)  # the README: every row keeps its "\n"
    assert join_rows(rows).startswith(rows[0])
