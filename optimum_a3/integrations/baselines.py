"""Low-rank baselines that A3 is measured against (method page, section 9).

* **Plain SVD**: every decoder-layer linear ``W`` is replaced by its best rank-``r`` approximation
  in the Frobenius norm of the weight.
* **SVD-LLM** (Wang et al., 2024, truncation-aware data whitening): the rank-``r`` approximation
  that minimises the error of the layer *output* on calibration data, ``||(W - W~) X^T||_F``.

Both replace each linear by two smaller linears (:class:`LowRankLinear`, two GEMMs) at the same
parameter budget, ``r = floor((1 - ratio) * m * n / (m + n))``.

Notation: ``W`` is ``nn.Linear.weight``, shape ``(out, in)``, ``y = x W^T``; ``X`` stacks the
linear's input rows, shape ``(tokens, in)``; ``X^T X`` is ``(in, in)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.adapters import adapter_for


class LowRankLinear(nn.Module):
    """``y = second(first(x))``: a rank-``rank`` factorisation of an ``nn.Linear``.

    ``first``: in -> rank, no bias; ``second``: rank -> out, carries the original bias (if any).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, linear: nn.Linear, first_weight: torch.Tensor, second_weight: torch.Tensor) -> LowRankLinear:
        """Build from factors ``A`` (rank, in) and ``B`` (out, rank) of ``linear.weight ≈ B @ A``.

        The new weights take ``linear``'s dtype and device; the bias is copied unchanged.
        """
        rank = first_weight.shape[0]
        if first_weight.shape != (rank, linear.in_features) or second_weight.shape != (linear.out_features, rank):
            raise ValueError(
                f"factor shapes {tuple(first_weight.shape)} / {tuple(second_weight.shape)} do not fit a "
                f"{linear.in_features}->{linear.out_features} linear"
            )
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.first.weight.copy_(first_weight.to(device=weight.device, dtype=weight.dtype))
            module.second.weight.copy_(second_weight.to(device=weight.device, dtype=weight.dtype))
            if linear.bias is not None:
                module.second.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def svd_rank(in_features: int, out_features: int, ratio: float) -> int:
    """Rank that removes a fraction ``ratio`` of an ``in x out`` weight: ``floor((1-ratio)·m·n/(m+n))``, >= 1.

    A rank-``r`` pair of factors holds ``r·(m+n)`` weights, so this keeps at most ``(1-ratio)·m·n``.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    exact = (1.0 - ratio) * in_features * out_features / (in_features + out_features)
    # The tiny epsilon stops float noise (e.g. 15.999999999) from costing a whole rank.
    return max(1, math.floor(exact + 1e-9))


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in [1, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}, got {rank}")


def plain_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``weight`` (Frobenius norm), as float64 factors ``(A, B)``.

    ``weight ≈ B @ A`` with ``A`` (rank, in) for ``first.weight`` and ``B`` (out, rank) for
    ``second.weight``; ``sqrt(Σ)`` goes to each factor so both have similar scales.
    """
    _check_rank(weight, rank)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a, b


def whitening_cholesky(xtx: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of ``X^T X`` (float64), ``X^T X = S S^T``.

    As SVD-LLM does, a matrix that is not positive definite gets ``(-λ_min + 1e-6)·I`` added first;
    if rounding still defeats the factorisation the shift is grown tenfold a few times.
    """
    gram = xtx.detach().to(torch.float64)
    gram = (gram + gram.T) / 2  # accumulated sums are symmetric only up to rounding
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0:
        return chol
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    shift = -torch.linalg.eigvalsh(gram)[0].item() + 1e-6
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if info.item() == 0:
            return chol
        shift *= 10
    raise RuntimeError("X^T X could not be made positive definite for the SVD-LLM whitening")


def svd_llm_factors(weight: torch.Tensor, xtx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM truncation-aware whitening, as float64 factors ``(A, B)`` with ``weight ≈ B @ A``.

    With ``X^T X = S S^T`` (Cholesky), ``||(W - W~) X^T||_F = ||(W - W~) S||_F``. So the SVD
    ``W S = U Σ V^T`` truncated to ``rank`` is the optimal ``W~ S`` (Eckart–Young; ``S`` is invertible),
    and ``W~ = U_r Σ_r V_r^T S^{-1}``. The discarded singular values of ``W S`` are exactly the output
    error. (The paper's row-vector ``S^T W`` is the same matrix transposed.)
    """
    _check_rank(weight, rank)
    w = weight.detach().to(torch.float64)
    if xtx.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"xtx must be ({w.shape[1]}, {w.shape[1]}) for a weight of shape {tuple(w.shape)}")
    s_chol = whitening_cholesky(xtx.to(w.device))
    u, sigma, vh = torch.linalg.svd(w @ s_chol, full_matrices=False)
    root = sigma[:rank].sqrt()
    # Unwhiten: M = V_r^T S^{-1} solves M S = V_r^T; a triangular solve is stabler than inverting S.
    vh_unwhitened = torch.linalg.solve_triangular(s_chol, vh[:rank], upper=False, left=False)
    a = root[:, None] * vh_unwhitened
    b = u[:, :rank] * root[None, :]
    return a, b


def _decoder_layers(model) -> nn.ModuleList:
    """The decoder layers, found by the model family's adapter (``UnsupportedModelError``, a ``ValueError``,
    for a family without one)."""
    return adapter_for(model, validate=False).layers(model)


def _shared_input_groups(adapter) -> dict[str, str]:
    """Path inside a layer -> group name, for the linears that read the same input (one X^T X per group)."""
    return {adapter.linear_paths[name]: "+".join(group) + "_input"
            for group in adapter.shared_input_groups for name in group}


def _decoder_linears(model) -> Iterator[tuple[int, str, nn.Linear]]:
    """``(layer index, name inside the layer, module)`` for every plain ``nn.Linear`` of every decoder layer."""
    for index, layer in enumerate(_decoder_layers(model)):
        # A LowRankLinear's children are nn.Linear too; never factorise them again.
        factor_ids = {id(m) for low in layer.modules() if isinstance(low, LowRankLinear) for m in low.children()}
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in factor_ids:
                yield index, name, module


def _replace_linears(model, ratio: float, factorise, desc: str, progress: bool) -> nn.Module:
    """Swap every decoder-layer linear of ``model`` (in place) for a ``LowRankLinear`` from ``factorise``."""
    adapter = adapter_for(model, validate=False)
    layers = adapter.layers(model)
    targets = list(_decoder_linears(model))
    if not targets:
        raise ValueError(f"no nn.Linear found inside model.{adapter.layers_path}")
    for index, name, linear in tqdm(targets, desc=desc, unit="linear", disable=not progress):
        rank = svd_rank(linear.in_features, linear.out_features, ratio)
        a, b = factorise(index, name, linear, rank)
        parent_name, _, child = name.rpartition(".")
        parent = layers[index].get_submodule(parent_name) if parent_name else layers[index]
        setattr(parent, child, LowRankLinear.from_factors(linear, a, b))
    return model


def compress_plain_svd(model, ratio: float, progress: bool = True) -> nn.Module:
    """A copy of ``model`` whose decoder-layer linears are plain-SVD :class:`LowRankLinear` s.

    ``ratio`` is the fraction of each linear's parameters removed (rank from :func:`svd_rank`).
    The input model is never modified; ``ratio == 0`` returns an untouched copy.
    """
    svd_rank(1, 1, ratio)  # validates ratio
    compressed = copy.deepcopy(model)
    if ratio == 0:
        return compressed
    return _replace_linears(compressed, ratio, lambda i, n, lin, r: plain_svd_factors(lin.weight, r),
                            "plain SVD", progress)


def collect_input_gram(model, calibration_ids: torch.Tensor, batch_size: int = 1,
                       progress: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """``X^T X`` (float64) of the input of every decoder-layer linear, keyed by ``(layer index, name)``.

    Runs ``calibration_ids`` (LongTensor ``(n, seqlen)``) through the decoder of ``model`` with forward
    pre-hooks; linears fed the same tensor (q/k/v, gate/up) share one matrix to save memory. The
    hooks are removed afterwards, so ``model`` is left as it was.
    """
    calibration_ids = torch.as_tensor(calibration_ids)
    if calibration_ids.dim() != 2 or calibration_ids.shape[0] == 0:
        raise ValueError(f"calibration_ids must be a LongTensor of shape (n, seqlen), got {tuple(calibration_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    grams: dict[tuple[int, str], torch.Tensor] = {}
    key_of: dict[tuple[int, str], tuple[int, str]] = {}
    handles = []

    def make_hook(key):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if key in grams:
                grams[key].addmm_(x.T, x)
            else:
                grams[key] = x.T @ x
        return hook

    adapter = adapter_for(model, validate=False)
    shared = _shared_input_groups(adapter)
    for index, name, linear in _decoder_linears(model):
        key = (index, shared.get(name, name))
        if key not in key_of.values():  # the first member of a group carries the hook for all
            handles.append(linear.register_forward_pre_hook(make_hook(key)))
        key_of[(index, name)] = key

    device = next(model.parameters()).device
    decoder = adapter.decoder(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, calibration_ids.shape[0], batch_size), desc="SVD-LLM calibration",
                              unit="batch", disable=not progress):
                # The decoder alone is enough: lm_head logits are not needed for the statistics.
                decoder(input_ids=calibration_ids[start:start + batch_size].long().to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name_key: grams[key] for name_key, key in key_of.items()}


def compress_svd_llm(model, ratio: float, calibration_ids: torch.Tensor | None = None, batch_size: int = 1,
                     progress: bool = True, grams: dict | None = None) -> nn.Module:
    """A copy of ``model`` whose decoder-layer linears are SVD-LLM :class:`LowRankLinear` s.

    ``X^T X`` of every linear's input is collected on the ORIGINAL model from ``calibration_ids``
    (LongTensor ``(n, seqlen)``); each linear is then factorised by :func:`svd_llm_factors` at the
    rank of :func:`svd_rank`. The input model is never modified; ``ratio == 0`` returns an untouched copy.
    ``grams`` (from :func:`collect_input_gram`) skips the calibration forward, e.g. to try several ratios.
    """
    svd_rank(1, 1, ratio)  # validates ratio
    if ratio == 0:
        return copy.deepcopy(model)
    if grams is None:
        if calibration_ids is None:
            raise ValueError("SVD-LLM needs calibration_ids (or precomputed grams)")
        grams = collect_input_gram(model, calibration_ids, batch_size=batch_size, progress=progress)
    compressed = copy.deepcopy(model)
    return _replace_linears(compressed, ratio, lambda i, n, lin, r: svd_llm_factors(lin.weight, grams[(i, n)], r),
                            "SVD-LLM", progress)
