"""Perplexity with the protocol of GPTQ, SVD-LLM and the A3 paper.

The protocol (see ``shared/data/README.md``): rows joined with ``"\\n\\n"``, tokenised once, cut into
non-overlapping windows of ``seqlen`` tokens from the start, tail dropped, each window evaluated on
its own (no context carried over), ``ppl = exp(mean token NLL)`` over all predicted tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration.text import (  # noqa: F401
    DEFAULT_WIKITEXT2_TEST_PATH,
    WIKITEXT2,
    join_rows,
    load_rows,
    wikitext2_test_rows,
)


@dataclass
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    ``nll`` is the mean negative log-likelihood per predicted token (nats), ``num_tokens`` the number of
    predicted tokens it averages over (``num_windows * (seqlen - 1)``).
    """

    ppl: float
    nll: float
    num_windows: int
    num_tokens: int
    seqlen: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for records and model cards."""
        return asdict(self)


def tokenize_rows(rows: Sequence[str], tokenizer) -> torch.LongTensor:
    """Join ``rows`` with ``"\\n\\n"`` and tokenise the text once, as the perplexity literature does.

    The tokenizer's default special-token behaviour is kept (e.g. Llama prepends one BOS to the whole
    text). No truncation: the text is usually far longer than ``model_max_length``, and the
    "sequence longer than max length" warning is silenced because windows are cut afterwards.

    Returns a 1-D ``LongTensor`` of token ids.
    """
    text = join_rows(rows)
    encoded = tokenizer(text, return_tensors="pt", truncation=False, verbose=False)
    return encoded.input_ids[0].long()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(model, token_ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True,
               device: str | torch.device | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on ``token_ids`` (1-D) with non-overlapping windows of ``seqlen`` tokens.

    The sequence is cut from the start, the incomplete tail is dropped and, if ``max_windows`` is
    given, only the first ``max_windows`` windows are kept. Each window predicts its positions
    1..seqlen-1 from the preceding tokens of the same window. Token NLLs come from float32 logits and
    are summed in float64; ``ppl = exp(sum / number of predicted tokens)``.

    ``device`` defaults to the device of the model's parameters.
    """
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (one context and one predicted token), got {seqlen!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}")
    token_ids = torch.as_tensor(token_ids)
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")

    num_windows = token_ids.numel() // seqlen
    if num_windows == 0:
        raise ValueError(f"{token_ids.numel()} tokens is fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    windows = token_ids[: num_windows * seqlen].long().view(num_windows, seqlen)

    device = torch.device(device) if device is not None else _model_device(model)
    nll_sum = torch.zeros((), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, num_windows, batch_size)
            for start in tqdm(starts, desc=f"perplexity (seqlen {seqlen})", unit="batch", disable=not progress):
                batch = windows[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Position t predicts token t+1: drop the last logit and the first target.
                shift_logits = logits[:, :-1, :].float()
                targets = batch[:, 1:]
                token_nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1),
                                            reduction="none")
                # float64 sum: a float32 running sum over ~300k tokens loses digits.
                nll_sum += token_nll.double().sum().cpu()
    finally:
        model.train(was_training)

    num_tokens = num_windows * (seqlen - 1)
    mean_nll = nll_sum.item() / num_tokens
    return PerplexityResult(ppl=math.exp(mean_nll), nll=mean_nll, num_windows=num_windows,
                            num_tokens=num_tokens, seqlen=seqlen)


def evaluate_perplexity(model, tokenizer, source: Any = WIKITEXT2, seqlen: int = 2048, batch_size: int = 1,
                        max_windows: int | None = None, progress: bool = True,
                        device: str | torch.device | None = None) -> PerplexityResult:
    """Tokenise a text source and compute :func:`perplexity` on it.

    ``source`` is anything :func:`optimum_a3.calibration.text.load_rows` accepts, or ``"wikitext2"`` (the WikiText-2
    test split: the local file ``../shared/data/wikitext-2-raw/wiki.test.raw`` if present, else
    ``datasets``), or ``"wikitext2:/path/to/wiki.test.raw"``.
    """
    token_ids = tokenize_rows(load_rows(source), tokenizer)
    return perplexity(model, token_ids, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows,
                      progress=progress, device=device)
