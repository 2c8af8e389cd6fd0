"""Architecture adapters: what the one A3 pipeline needs to know about a model family.

An adapter names the decoder layers and the projections whose inputs are calibrated, reads a layer's
weights in the method's (in, out) notation, and builds the compressed model's config. Everything
else (statistics, solvers, surgery, saving) is shared.

Adapters are the only place that knows module paths: size counters, baselines, LoRA recovery and the
compressor ask :func:`adapter_for` (or :func:`decoder_layers`), also for compressed A3 models
(``model_type="a3_llama"``, laid out like Llama) and quantized ones (same paths, other linear classes).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import A3Error
from .a3_llama import A3LlamaConfig, A3LlamaForCausalLM


class UnsupportedModelError(A3Error, ValueError):
    """The model's architecture has no A3 adapter."""


@dataclass(frozen=True)
class Geometry:
    """Shapes of a decoder that matter to A3."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope: bool

    @property
    def is_mha(self) -> bool:
        return self.num_heads == self.num_kv_heads


class LlamaFamilyAdapter:
    """Llama 2/3, Mistral, SmolLM and other Llama-architecture models (RoPE, MHA or GQA, SwiGLU, RMSNorm)."""

    model_types = ("llama", "mistral", "a3_llama")
    compressed_model_class = A3LlamaForCausalLM

    def geometry(self, model: nn.Module) -> Geometry:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        inter = c.intermediate_size
        if isinstance(inter, list):
            raise UnsupportedModelError("re-compressing a model with per-layer MLP widths is not supported")
        return Geometry(
            num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
            intermediate_size=inter, rope=True,
        )

    def validate(self, model: nn.Module) -> None:
        c = model.config
        if getattr(c, "model_type", None) == "a3_llama":
            raise UnsupportedModelError("this model is already A3-compressed; compress the original model instead")
        rope_type = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "dynamic":
            raise UnsupportedModelError("dynamic RoPE scaling is not supported (its frequencies change with length)")
        if getattr(c, "hidden_act", "silu") not in ("silu", "swish"):
            raise UnsupportedModelError(f"only SwiGLU MLPs are supported, got hidden_act={c.hidden_act!r}")
        self.sliding_window(model)  # refuses mixed full/sliding layers

    def sliding_window(self, model: nn.Module) -> int | None:
        """The attention window of every layer, or ``None`` for full causal attention."""
        c = model.config
        layer_types = set(getattr(c, "layer_types", None) or [])
        if layer_types - {"full_attention", "sliding_attention"} or len(layer_types) > 1:
            raise UnsupportedModelError(f"per-layer attention types {sorted(layer_types)} are not supported; "
                                        "only models whose layers all use the same attention")
        if layer_types == {"full_attention"}:
            return None
        return getattr(c, "sliding_window", None)

    # Components A3 may shrink in this family (see Qwen3 for one that keeps q/k).
    compressible_components = ("qk", "ov", "mlp")

    def config_overrides(self, model: nn.Module) -> dict:
        """Compressed-config fields that differ from the original config's (family specific)."""
        return {}

    # Where the decoder stack (the model without its LM head) and its list of layers live.
    decoder_path = "model"
    layers_path = "model.layers"

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.decoder_path)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    # Modules whose INPUT is calibrated: attention input (q_proj), attention-weighted values (o_proj),
    # and the down_proj input.
    def attention_input_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.q_proj

    def attention_output_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn.o_proj

    def mlp_down_module(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.down_proj

    # The second half of a pre-norm decoder layer, which sequential calibration runs on its own:
    # ``h + mlp(norm(h))`` where ``h`` is the residual stream after attention (the norm's input).
    def post_attention_norm_module(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attention_residual_from_heads(self, layer: nn.Module, hidden, heads):
        """``h + attention(h)`` given the attention's per-head output for ``h`` (o_proj's input)."""
        return hidden + self.attention_output_module(layer)(heads)

    def mlp_residual(self, layer: nn.Module, hidden):
        """``h + mlp(norm(h))``, running the whole MLP."""
        return hidden + self.mlp_module(layer)(self.post_attention_norm_module(layer)(hidden))

    def mlp_residual_from_intermediate(self, layer: nn.Module, hidden, intermediate):
        """``h + mlp(norm(h))`` given the MLP's intermediate for ``h`` (down_proj's input)."""
        return hidden + self.mlp_down_module(layer)(intermediate)

    # Where each component lives inside a decoder layer, in the original and the compressed model alike.
    linear_paths = {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    }
    rope_pairs_path = "self_attn.rope_pairs"
    # Components whose linears read the very same input tensor (one input statistic serves a group).
    shared_input_groups = (("q", "k", "v"), ("gate", "up"))

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {name: layer.get_submodule(path) for name, path in self.linear_paths.items()}

    def lora_targets(self) -> list[str]:
        """peft ``target_modules`` for every projection A3 resizes: the module names of ``linear_paths``."""
        return [path.rpartition(".")[2] for path in self.linear_paths.values()]

    def compressed_config(self, model: nn.Module, dims: list, record: dict) -> A3LlamaConfig:
        original = model.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version",
                    "_name_or_path", "dtype", "torch_dtype"):
            original.pop(key, None)
        uniform = lambda values: values[0] if len(set(values)) == 1 else list(values)  # noqa: E731
        known = {f for f in A3LlamaConfig.__dataclass_fields__} | {
            "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"}
        kept = {k: v for k, v in original.items() if k in known}
        kept.update(
            head_dim=self.geometry(model).head_dim,
            head_dim_qk=uniform([d.head_dim_qk for d in dims]),
            head_dim_vo=uniform([d.head_dim_vo for d in dims]),
            intermediate_size=uniform([d.intermediate_size for d in dims]),
            sliding_window=self.sliding_window(model),
            a3_compression=record,
            **self.config_overrides(model),
        )
        config = A3LlamaConfig(**kept)
        config.dtype = model.dtype
        return config


class Qwen2Adapter(LlamaFamilyAdapter):
    """Qwen2 / Qwen2.5: Llama layers with q/k/v biases and no o_proj bias.

    The compressed model has biases on all four projections: q/k keep the bias entries of their kept
    dims, the v_proj bias is folded exactly into the o_proj bias (and stored as zeros).
    """

    model_types = ("qwen2",)

    def config_overrides(self, model: nn.Module) -> dict:
        return {"attention_bias": True, "mlp_bias": False}


class Qwen3Adapter(LlamaFamilyAdapter):
    """Qwen3: Llama layers with a per-head RMSNorm on queries and keys before RoPE.

    That norm divides each head by its RMS over ALL head dims, which a model keeping fewer q/k dims
    cannot compute, and any approximation changes every attention score. So A3 leaves q/k untouched
    here and compresses OV and the MLP only (the KV cache still shrinks through the values).
    """

    model_types = ("qwen3",)
    compressible_components = ("ov", "mlp")

    def config_overrides(self, model: nn.Module) -> dict:
        return {"qk_norm": True, "attention_bias": bool(getattr(model.config, "attention_bias", False)),
                "mlp_bias": False}


ADAPTERS = [LlamaFamilyAdapter(), Qwen2Adapter(), Qwen3Adapter()]


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types if not t.startswith("a3_")})


def adapter_for(model: nn.Module, validate: bool = True):
    """The adapter of ``model``'s architecture; a clear error naming the supported ones otherwise.

    ``validate=False`` skips the checks that the model can be compressed, to look up module paths only:
    compressed A3 models (``a3_llama``, refused for compression) and quantized models resolve too.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if validate:
                adapter.validate(model)
            return adapter
    raise UnsupportedModelError(
        f"A3 does not support model_type={model_type!r} yet; supported: {', '.join(supported_model_types())}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (original, compressed or quantized), found by its adapter."""
    return adapter_for(model, validate=False).layers(model)
