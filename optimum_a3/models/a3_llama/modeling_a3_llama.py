# Copyright 2026 The optimum-a3 authors. Licensed under the Apache License, Version 2.0.
"""PyTorch A3-Llama: a Llama-family decoder whose inner dimensions were reduced by A3.

Self-contained (imports only torch and transformers) so that `save_pretrained` can ship it as remote
code. Differences from `modeling_llama`:
  * per layer, q/k heads have `head_dim_qk` dims, v heads and the o_proj input have `head_dim_vo`;
  * each layer keeps a subset of the original rotary frequencies per key/value head (`rope_pairs`);
  * the softmax scale stays `1/sqrt(head_dim)` of the ORIGINAL model (the kept dims approximate the
    original dot product), passed explicitly to every attention backend;
  * the MLP width may differ per layer;
  * optional per-head q/k RMSNorm before RoPE (`qk_norm`, Qwen3) and q/k/v/o biases (`attention_bias`,
    Qwen2: the v_proj bias is folded into the o_proj bias by A3).
"""

import inspect
from collections.abc import Callable

import torch
from torch import nn

from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_a3_llama import A3LlamaConfig

# transformers renamed `past_key_values` to `cache` (5.24); accept and emit whichever this version uses.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class A3LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def compute_inv_freq(config: A3LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the ORIGINAL head_dim (one per rotary pair) and the attention scaling."""
    rope_parameters = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        dim = config.head_dim
        base = rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config)


class A3LlamaRotaryEmbedding(nn.Module):
    """Angles of every original rotary pair; each layer gathers the pairs it kept.

    The inverse frequencies are recomputed from the config on first use (not a buffer): models are
    built on the meta device by `from_pretrained`, and a non-persistent buffer would not be restored.
    """

    def __init__(self, config: A3LlamaConfig):
        super().__init__()
        self.config = config
        self._inv_freq = None

    def forward(self, x, position_ids):
        if self._inv_freq is None or self._inv_freq.device != x.device:
            inv_freq, self.attention_scaling = compute_inv_freq(self.config)
            self._inv_freq = inv_freq.to(x.device)
        freqs = position_ids[..., None].float() * self._inv_freq  # (batch, seq, head_dim/2)
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def apply_kept_rotary(x, cos, sin, width):
    """RoPE in the half-split layout (dim p pairs with p + d/2, as HF `rotate_half`), zero-padded to `width`.

    `x` (..., d) with the angles `cos`/`sin` (..., d/2) of its d/2 kept pairs: the first half becomes
    `x1*cos - x2*sin`, the second `x2*cos + x1*sin`, i.e. `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`.
    Without autograd the halves are written straight into the padded output (no rotated copy, no
    `cat`, no separate padding copy).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return nn.functional.pad(out, (0, width - 2 * half)) if width > 2 * half else out
    out = x.new_empty(*torch.broadcast_shapes(x1.shape, cos.shape)[:-1], width)
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if width > 2 * half:
        out[..., 2 * half :].zero_()
    return out


def _plain_linear(module) -> bool:
    """A bare `nn.Linear` without hooks (not wrapped or replaced, e.g. by quantization or adapters),
    whose product may be computed from its weight directly."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def _token_major(tokens: int, out_features: int) -> bool:
    """Whether to compute a linear layer as `weight @ x.T` (see `_linear_transposed`).

    MKL writes row-major (tokens, out) outputs whose width is not a multiple of 8 (A3 widths such as
    1229) ~25-30% slower than aligned ones; the transposed product has the token count as its leading
    dimension instead, which helps when that count is a multiple of 8 and not tiny.
    """
    return out_features % 8 != 0 and tokens % 8 == 0 and tokens >= 32


def _linear_transposed(x, linear):
    """`linear(x).T` for 2-D `x` (tokens, in), computed as `weight @ x.T` -> (out, tokens)."""
    if linear.bias is None:
        return torch.mm(linear.weight, x.t())
    return torch.addmm(linear.bias[:, None], linear.weight, x.t())


class A3LlamaMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        gate, up = self.gate_proj, self.up_proj
        tokens = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and _token_major(tokens, gate.out_features) and _plain_linear(gate) and _plain_linear(up):
            flat = x.reshape(tokens, x.shape[-1])
            hidden = self.act_fn(_linear_transposed(flat, gate)) * _linear_transposed(flat, up)  # (intermediate, tokens)
            # `hidden.t()` is a view: down_proj reads it as a transposed operand, without a copy.
            return self.down_proj(hidden.t().view(*x.shape[:-1], -1))
        return self.down_proj(self.act_fn(gate(x)) * up(x))


def repeat_kv(hidden_states, n_rep):
    """(batch, kv_heads, seq, d) -> (batch, kv_heads * n_rep, seq, d), as `repeat_interleave` on dim 1."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def pad_head_dim(states, width):
    """Zero-pad the last dim to `width` (no copy when it already has that width)."""
    return states if states.shape[-1] == width else nn.functional.pad(states, (0, width - states.shape[-1]))


def common_head_dim(head_dim_qk: int, head_dim_vo: int) -> int:
    """Head dim shared by q, k and v for SDPA: the larger one, rounded up to a multiple of 4.

    Zero-padding is exact (zeros add nothing to q·k, padded value columns are sliced off); the CPU flash
    kernel is markedly slower for head dims that are not a multiple of 4 (45 costs as much as 56).
    """
    return -(-max(head_dim_qk, head_dim_vo) // 4) * 4


class A3LlamaAttention(nn.Module):
    """Multi-headed (GQA) attention with reduced q/k and v/o head dims and kept rotary pairs."""

    def __init__(self, config: A3LlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.head_dim_qk, self.head_dim_vo, _ = config.layer_dims(layer_idx)
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5  # ORIGINAL head_dim, not head_dim_qk
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window

        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim_qk, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim_qk, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim_vo, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim_vo, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = A3LlamaRMSNorm(self.head_dim_qk, eps=config.rms_norm_eps)
            self.k_norm = A3LlamaRMSNorm(self.head_dim_qk, eps=config.rms_norm_eps)
        # Kept rotary frequency indices per key/value head (sorted); query heads use their group's row.
        pairs = torch.arange(self.head_dim_qk // 2).repeat(self.num_key_value_heads, 1)
        self.register_buffer("rope_pairs", pairs, persistent=True)

    def kept_rotary(self, cos, sin):
        """Gather this layer's frequencies: (batch, seq, head_dim/2) -> (batch, kv_heads, 1, seq, head_dim_qk/2).

        One angle per kept pair (both halves of a head share it); the singleton dim broadcasts over the
        query heads of each key/value group.
        """
        cos = cos[..., self.rope_pairs].permute(0, 2, 1, 3).unsqueeze(2)
        sin = sin[..., self.rope_pairs].permute(0, 2, 1, 3).unsqueeze(2)
        return cos, sin

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, seq_len = hidden_states.shape[:-1]

        query_states = self.q_proj(hidden_states).view(batch, seq_len, -1, self.head_dim_qk)
        key_states = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim_qk)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(batch, seq_len, -1, self.head_dim_vo).transpose(1, 2)

        # Fused SDPA kernels need one head dim for q, k and v (`common_head_dim`; several times faster on
        # CPU than the fallback). Without a cache, RoPE writes q and k straight into the padded tensors;
        # the cache keeps the unpadded, smaller ones.
        sdpa = self.config._attn_implementation != "eager"
        width = common_head_dim(self.head_dim_qk, self.head_dim_vo) if sdpa else self.head_dim_qk
        rope_width = width if cache is None else self.head_dim_qk
        cos, sin = self.kept_rotary(*position_embeddings)
        kv_heads, groups = self.num_key_value_heads, self.num_key_value_groups
        query_states = apply_kept_rotary(
            query_states.view(batch, kv_heads, groups, seq_len, self.head_dim_qk), cos, sin, rope_width
        ).view(batch, self.num_heads, seq_len, rope_width)
        key_states = apply_kept_rotary(key_states.unsqueeze(2), cos, sin, rope_width).squeeze(2)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = eager_attention_forward
        if sdpa:
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
            query_states, key_states, value_states = (
                pad_head_dim(states, width) for states in (query_states, key_states, value_states)
            )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output[..., : self.head_dim_vo].reshape(batch, seq_len, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class A3LlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: A3LlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = A3LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = A3LlamaMLP(config, config.layer_dims(layer_idx)[2])
        self.input_layernorm = A3LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = A3LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class A3LlamaPreTrainedModel(PreTrainedModel):
    config_class = A3LlamaConfig
    config: A3LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["A3LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False  # flash kernels need equal q/k and v head dims
    _supports_flex_attn = False
    _supports_attention_backend = False


class A3LlamaModel(A3LlamaPreTrainedModel):
    def __init__(self, config: A3LlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([A3LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = A3LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = A3LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        # Written out rather than through transformers' output-capturing decorators, which older releases lack.
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if kwargs.pop("output_attentions", None):
            raise ValueError("output_attentions is not supported by A3 models (their attention runs through sdpa)")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden_states = [] if output_hidden_states else None
        for decoder_layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:  # as transformers' Llama: the embeddings, ..., the final norm's output
            all_hidden_states = tuple(all_hidden_states) + (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                       **{_OUTPUT_CACHE_FIELD: cache})


class A3LlamaForCausalLM(A3LlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: A3LlamaConfig):
        super().__init__(config)
        self.model = A3LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)}
        )


__all__ = ["A3LlamaForCausalLM", "A3LlamaModel", "A3LlamaPreTrainedModel"]
