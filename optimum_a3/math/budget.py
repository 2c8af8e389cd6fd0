"""Dimension budgets (method page §7) and the size figures users compare: parameters, KV-cache bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import adapter_for, decoder_layers


# The LayerDims field of each component (also the A3Config field that sets its dims explicitly).
DIM_FIELDS = {"qk": "head_dim_qk", "ov": "head_dim_vo", "mlp": "intermediate_size"}


@dataclass(frozen=True)
class LayerDims:
    """Inner dimensions of one decoder layer."""

    head_dim_qk: int
    head_dim_vo: int
    intermediate_size: int

    def of(self, component: str) -> int:
        """The dim of ``component`` ("qk", "ov" or "mlp")."""
        return getattr(self, DIM_FIELDS[component])


def uniform_dims(ratio: float, head_dim: int, intermediate_size: int, rope: bool = True) -> LayerDims:
    """§7: remove ≈``ratio`` of every projection and of the KV cache (q/k dims rounded to whole pairs)."""
    keep = 1.0 - ratio
    qk = 2 * round(keep * head_dim / 2) if rope else round(keep * head_dim)
    return LayerDims(
        head_dim_qk=max(2 if rope else 1, qk),
        head_dim_vo=max(1, round(keep * head_dim)),
        intermediate_size=max(1, round(keep * intermediate_size)),
    )


def decoder_linear_params(model: nn.Module) -> int:
    """Parameters of all linear layers inside the decoder layers (embeddings and lm_head excluded)."""
    total = 0
    for module in decoder_layers(model).modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    return total


def total_params(model: nn.Module) -> int:
    """All parameters, counting tied embeddings once."""
    # parameters() yields a tied Parameter once; storage sharing between distinct Parameters is caught
    # by data_ptr (meaningless on the meta device, where every pointer is 0).
    seen, total = set(), 0
    for p in model.parameters():
        key = id(p) if p.device.type == "meta" else p.data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def kv_cache_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of key + value cache per token over all layers (from the k_proj/v_proj output widths)."""
    dtype = dtype or next(model.parameters()).dtype
    adapter = adapter_for(model, validate=False)
    width = 0
    for layer in adapter.layers(model):
        width += sum(layer.get_submodule(adapter.linear_paths[name]).out_features for name in ("k", "v"))
    return width * torch.tensor([], dtype=dtype).element_size()

