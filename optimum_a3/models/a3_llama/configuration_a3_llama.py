# Copyright 2026 The optimum-a3 authors. Licensed under the Apache License, Version 2.0.
"""Configuration of an A3-compressed Llama-family model (self-contained: imports only transformers)."""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class A3LlamaConfig(LlamaConfig):
    r"""
    A [`LlamaConfig`] whose decoder layers have reduced inner dimensions, as produced by A3.

    `head_dim` stays the ORIGINAL head dimension: it fixes the softmax scale `1/sqrt(head_dim)` and the
    rotary frequencies, of which every layer keeps a subset (stored in the checkpoint as
    `model.layers.{i}.self_attn.rope_pairs`, one row of kept frequency indices per key/value head).

    Args:
        head_dim_qk (`int` or `list[int]`, *optional*):
            Query/key dimension per head after compression (even with RoPE), one value or one per layer.
            Defaults to `head_dim`.
        head_dim_vo (`int` or `list[int]`, *optional*):
            Value dimension per head (also the per-head input width of `o_proj`). Defaults to `head_dim`.
        intermediate_size (`int` or `list[int]`):
            MLP width, one value or one per layer.
        sliding_window (`int`, *optional*):
            Sliding-window attention span (Mistral); `None` for full causal attention.
        qk_norm (`bool`, *optional*, defaults to `False`):
            Per-head RMSNorm of queries and keys before RoPE (Qwen3). It normalises over the whole head, so
            it requires `head_dim_qk == head_dim` (A3 leaves q/k of such models uncompressed).
        a3_compression (`dict`, *optional*):
            Record of how the model was compressed (base model, ratio, dims, calibration, seed, version).
    """

    model_type = "a3_llama"

    intermediate_size: int | list[int] = 11008
    head_dim_qk: int | list[int] | None = None
    head_dim_vo: int | list[int] | None = None
    sliding_window: int | None = None
    qk_norm: bool = False
    a3_compression: dict | None = None

    def __post_init__(self, **kwargs):
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.head_dim_qk is None:
            self.head_dim_qk = head_dim
        if self.head_dim_vo is None:
            self.head_dim_vo = head_dim
        super().__post_init__(**kwargs)

    def _per_layer(self, value, layer_idx: int) -> int:
        return value[layer_idx] if isinstance(value, list) else value

    def layer_dims(self, layer_idx: int) -> tuple[int, int, int]:
        """`(head_dim_qk, head_dim_vo, intermediate_size)` of decoder layer `layer_idx`."""
        return (
            self._per_layer(self.head_dim_qk, layer_idx),
            self._per_layer(self.head_dim_vo, layer_idx),
            self._per_layer(self.intermediate_size, layer_idx),
        )

    def validate_architecture(self):
        """Part of `@strict` validation: per-layer lists must cover every layer, dims must fit."""
        super().validate_architecture()
        for name in ("head_dim_qk", "head_dim_vo", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(value)} entries for {self.num_hidden_layers} layers")
            for v in value if isinstance(value, list) else [value]:
                if v < 1:
                    raise ValueError(f"{name} must be >= 1, got {v}")
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        for v in self.head_dim_qk if isinstance(self.head_dim_qk, list) else [self.head_dim_qk]:
            if v % 2 or v > head_dim:
                raise ValueError(f"head_dim_qk must be even and <= head_dim={head_dim} (whole rotary pairs), got {v}")
            if self.qk_norm and v != head_dim:
                raise ValueError(f"qk_norm normalises whole heads: head_dim_qk must equal head_dim={head_dim}, got {v}")


__all__ = ["A3LlamaConfig"]
