"""Float64 helpers for positive semi-definite matrices (pure functions)."""

from __future__ import annotations

import torch

DEFAULT_EIG_FLOOR = 1e-10


def psd_roots(matrix: torch.Tensor, eig_floor: float = DEFAULT_EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(M^{1/2}, M^{-1/2})`` of a symmetric PSD matrix, computed in float64.

    Eigenvalues below ``eig_floor * max_eigenvalue`` are clamped to that floor (GPTQ-style damping),
    so the inverse root always exists. Works on batches (``(..., n, n)``).
    """
    m = matrix.to(torch.float64)
    m = 0.5 * (m + m.transpose(-1, -2))  # symmetrise away accumulation round-off
    eigvals, eigvecs = torch.linalg.eigh(m)
    top = eigvals.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    eigvals = torch.maximum(eigvals, top * eig_floor)
    sqrt_vals = eigvals.sqrt()
    root = (eigvecs * sqrt_vals.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)
    inv_root = (eigvecs / sqrt_vals.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)
    return root, inv_root


def gram(weight: torch.Tensor, autocorr: torch.Tensor) -> torch.Tensor:
    """``Wᵀ R W`` for ``W`` of shape (in, out) (or batched (..., in, out)), in float64."""
    w = weight.to(torch.float64)
    return w.transpose(-1, -2) @ autocorr.to(torch.float64) @ w


def diag_gram(weight: torch.Tensor, autocorr: torch.Tensor) -> torch.Tensor:
    """Diagonal of ``Wᵀ R W`` without forming it: ``E[(xW)_j^2]`` per output column."""
    w = weight.to(torch.float64)
    return ((autocorr.to(torch.float64) @ w) * w).sum(dim=-2)
