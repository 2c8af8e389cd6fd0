"""Calibration windows: text -> ``(nsamples, seqlen)`` token ids, sampled reproducibly."""

from __future__ import annotations

from typing import Any

import torch

from .text import join_rows, load_rows
from ..errors import A3Error

# Read ~4x more text than strictly needed so sampled windows come from across the source.
_OVERSAMPLE = 4
_CHARS_PER_TOKEN_UPPER = 8


class CalibrationDataError(A3Error, ValueError):
    """Too little (or unusable) calibration data."""


def tokenize_prefix(rows: list[str], tokenizer, tokens_needed: int) -> torch.Tensor:
    """Tokenize (once, rows joined with blank lines) a prefix of ``rows`` large enough for ``tokens_needed``.

    Large corpora are not tokenized whole: rows are taken until their text is comfortably longer than
    needed; if that falls short, every row is used.
    """
    char_budget = tokens_needed * _OVERSAMPLE * _CHARS_PER_TOKEN_UPPER
    taken, chars = [], 0
    for row in rows:
        taken.append(row)
        chars += len(row) + 2
        if chars >= char_budget:
            break
    ids = tokenizer(join_rows(taken), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < tokens_needed * _OVERSAMPLE and len(taken) < len(rows):
        ids = tokenizer(join_rows(rows), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` distinct non-overlapping windows of ``seqlen`` tokens, chosen with ``seed``, in text order."""
    available = token_ids.numel() // seqlen
    if available < nsamples:
        raise CalibrationDataError(
            f"calibration data has {token_ids.numel():,} tokens, fewer than nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen:,}: give more text or lower nsamples/seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:nsamples].sort().values
    windows = token_ids[: available * seqlen].view(available, seqlen)
    return windows[chosen].clone()


def calibration_windows(tokenizer, source: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Token windows for calibration from any text source accepted by :func:`optimum_a3.calibration.text.load_rows`."""
    if tokenizer is None:
        raise CalibrationDataError("a tokenizer is needed to calibrate on text (or pass calibration_ids)")
    rows = load_rows(source)
    ids = tokenize_prefix(rows, tokenizer, nsamples * seqlen)
    return sample_windows(ids, nsamples, seqlen, seed)
