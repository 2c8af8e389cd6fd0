"""Layer surgery: the compressed model's skeleton, and solved weights put into it.

The solvers return state-dict entries of one compressed layer (:mod:`optimum_a3.pipeline.layer_solver`);
these functions build the smaller model those entries fit, load them into its layers, and copy what A3
does not touch (embeddings, final norm, lm_head).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapters import decoder_layers


def empty_compressed_model(adapter, model: nn.Module, dims: list, record: dict, materialize: bool = True) -> nn.Module:
    """The compressed model's skeleton on the meta device; allocated (uninitialised) if ``materialize``."""
    config = adapter.compressed_config(model, dims, record)
    config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    with torch.device("meta"):
        compressed = adapter.compressed_model_class(config)
    compressed = compressed.to(model.dtype)
    if materialize:
        compressed = compressed.to_empty(device=model.get_input_embeddings().weight.device)
    # Eval mode, as from_pretrained gives: sequential calibration runs these layers (no dropout there).
    return compressed.eval()


def layer_state(original: nn.Module, new_entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compressed layer's state: the solved entries, everything else (norms, some biases) as is."""
    state = dict(original.state_dict())
    state.update(new_entries)
    return state


def attention_state(adapter, original: nn.Module, attention_entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state of a compressed layer whose attention alone is solved: its MLP entries left out."""
    mlp = tuple(f"{adapter.linear_paths[name]}." for name in ("gate", "up", "down"))
    return {k: v for k, v in layer_state(original, attention_entries).items() if not k.startswith(mlp)}


def fill_layer(target: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    """Load ``state`` into a compressed layer, allocating it first if it is still on the meta device
    (streaming); ``strict=False`` for the attention-only state of sequential calibration."""
    if any(p.is_meta for p in target.parameters()):
        target.to_empty(device=next(iter(state.values())).device)
    _, unexpected = target.load_state_dict(state, strict=strict)
    if unexpected:
        raise RuntimeError(f"unexpected compressed-layer entries: {unexpected}")


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of ``model``'s decoder layers, e.g. ``"model.layers."``."""
    layers = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is layers) + "."


def outside_layer_names(compressed: nn.Module) -> list[str]:
    """State-dict names of what lies outside the decoder layers and is stored: embeddings, final norm and an
    untied lm_head (a tied one is the embedding)."""
    prefix = layers_prefix(compressed)
    names = [k for k in compressed.state_dict() if not k.startswith(prefix)]
    if compressed.config.tie_word_embeddings:
        names = [k for k in names if k != "lm_head.weight"]
    return names


def copy_outside_layers(model: nn.Module, compressed: nn.Module) -> None:
    """Embeddings, final norm and lm_head are not touched by A3: copy them (and re-tie)."""
    original_layers, compressed_layers = layers_prefix(model), layers_prefix(compressed)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(original_layers)}
    missing, unexpected = compressed.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(compressed_layers)]
    if compressed.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        compressed.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"weights outside the decoder layers do not match: missing={missing} unexpected={unexpected}")
