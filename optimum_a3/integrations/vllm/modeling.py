"""Native vLLM model for A3 checkpoints (``model_type: a3_llama``, architecture ``A3LlamaForCausalLM``).

The reference semantics are those of ``optimum_a3/models/a3_llama/modeling_a3_llama.py`` (the remote code
shipped with every checkpoint); this module computes the same function with vLLM's layers, paged KV cache
and attention backends:

* per layer, q/k heads of ``head_dim_qk``, v heads and the ``o_proj`` input of ``head_dim_vo``, an MLP of
  that layer's width (a config value may be one int or a list with one entry per layer), zero-padded to a
  multiple of 16 channels, which is exact and makes its GEMMs aligned (:class:`A3MLP`);
* the softmax scale of the ORIGINAL ``head_dim``;
* RoPE in the half-split (``rotate_half``) layout over the ``head_dim_qk`` dims of a head, with the rotary
  frequencies each key/value group kept (the checkpoint's ``model.layers.{i}.self_attn.rope_pairs``): the
  angles of every original pair are tabulated once and each layer gathers its own pairs per group, which
  vLLM's stock rotary embedding (one frequency set for all heads) cannot express;
* q/k/v/o biases (``attention_bias``, Qwen2), per-head q/k RMSNorm before RoPE (``qk_norm``, Qwen3),
  ``mlp_bias``, a tied or untied ``lm_head``, a sliding window (Mistral).

Attention head sizes: vLLM's attention backends take one q/k head size and, except the ``*_DIFFKV`` ones,
the same size for v, and some accept only some sizes (CPU_ATTN: 32, 64, 80, 96, 112, 128, 160, ...;
FLASH_ATTN: multiples of 8; TRITON_ATTN: >= 32; FLEX_ATTENTION: any). :func:`attention_head_sizes` gives
each layer the smallest sizes its backend accepts for that layer's dims; q, k and v are zero-padded up to
them inside the model, which is exact: zero dims add nothing to q.k, and the padded value dims give output
columns that are zero and are dropped before ``o_proj``. vLLM's KV cache manager allocates each layer at its
own size. The KV cache then holds the padded sizes; what that costs per token is logged once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backend import AttentionType

from ...models.a3_llama.modeling_a3_llama import compute_inv_freq

# Under "vllm." so that vLLM's logging configuration shows it.
logger = init_logger("vllm.optimum_a3")

# Checkpoint names -> (vLLM fused parameter, shard id), as in vLLM's own Llama.
_STACKED_PARAMS = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)
# A head size is searched up to this bound (the largest any vLLM backend lists).
_MAX_HEAD_SIZE = 1024
# MLP widths are zero-padded to a multiple of this (see A3MLP).
MLP_WIDTH_MULTIPLE = 16


def _per_layer(value, layer_idx: int) -> int:
    return value[layer_idx] if isinstance(value, (list, tuple)) else value


def layer_dims(config, layer_idx: int) -> tuple[int, int, int]:
    """``(head_dim_qk, head_dim_vo, intermediate_size)`` of layer ``layer_idx`` (one int or per-layer lists)."""
    head_dim = original_head_dim(config)
    qk = getattr(config, "head_dim_qk", None) or head_dim
    vo = getattr(config, "head_dim_vo", None) or head_dim
    return _per_layer(qk, layer_idx), _per_layer(vo, layer_idx), _per_layer(config.intermediate_size, layer_idx)


def original_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _smallest_supported(backend, size: int) -> int:
    for width in range(max(size, 1), _MAX_HEAD_SIZE + 1):
        if backend.supports_head_size(width):
            return width
    raise ValueError(f"attention backend {backend.get_name()} accepts no head size >= {size}")


def is_diffkv(backend) -> bool:
    """Whether the backend stores K and V with different head sizes (vLLM's ``*_DIFFKV`` backends)."""
    return backend.get_name().endswith("_DIFFKV") and hasattr(backend, "set_head_size_v")


def attention_head_sizes(backend, head_dim_qk: int, head_dim_vo: int) -> tuple[int, int]:
    """``(k_size, v_size)`` the backend runs for real sizes ``head_dim_qk``, ``head_dim_vo`` (padded up when needed).

    Backends with one head size for K and V get the smallest accepted size >= both (CPU_ATTN: from its list;
    TRITON_ATTN, FLEX_ATTENTION: any size >= 32 / any size, i.e. the larger real one); the ``*_DIFFKV``
    backends keep V at its real size and K at the smallest accepted size >= ``head_dim_qk``.
    """
    if is_diffkv(backend):
        return _smallest_supported(backend, head_dim_qk), head_dim_vo
    width = _smallest_supported(backend, max(head_dim_qk, head_dim_vo))
    return width, width


def select_backend(config, dtype: torch.dtype, kv_cache_dtype: str, has_sliding_window: bool):
    """The attention backend vLLM picks for this model (the user's ``--attention-backend`` if given)."""
    from vllm.v1.attention.selector import get_attn_backend

    candidates = [original_head_dim(config)] + [w for w in (32, 64, 128, 256) if w != original_head_dim(config)]
    error = None
    for head_size in candidates:
        try:
            return get_attn_backend(head_size, dtype, kv_cache_dtype, attn_type=AttentionType.DECODER,
                                    has_sliding_window=has_sliding_window)
        except (ValueError, NotImplementedError, AssertionError) as exc:  # no backend for this size
            error = exc
    raise ValueError(f"vLLM found no attention backend for this A3 model: {error}")


class A3AttentionPlan:
    """The attention backend of the model and the K/V head sizes it runs in each layer.

    Each layer gets the smallest sizes the backend accepts for its own dims (vLLM's KV cache manager keeps
    full-attention layers of different head sizes in one group, each with its own page size); the DiffKV
    backends read V's size from a class attribute, so there V has one size for all layers (the largest).
    """

    def __init__(self, vllm_config: VllmConfig, config):
        cache_config = vllm_config.cache_config
        kv_cache_dtype = cache_config.cache_dtype if cache_config is not None else "auto"
        dtype = vllm_config.model_config.dtype if vllm_config.model_config is not None else torch.get_default_dtype()
        sliding = getattr(config, "sliding_window", None) is not None
        self.backend = select_backend(config, dtype, kv_cache_dtype, sliding)
        dims = [layer_dims(config, i) for i in range(config.num_hidden_layers)]
        self.real_qk = [d[0] for d in dims]
        self.real_vo = [d[1] for d in dims]
        self.sizes = [attention_head_sizes(self.backend, qk, vo) for qk, vo in zip(self.real_qk, self.real_vo)]
        if is_diffkv(self.backend):
            v_size = max(self.real_vo)
            self.sizes = [(k, v_size) for k, _ in self.sizes]
            self.backend.set_head_size_v(v_size)  # the DiffKV backends read V's size from the class
        self._log(config, dtype)

    def _log(self, config, dtype):
        kv_heads = config.num_key_value_heads
        elt = torch.tensor([], dtype=dtype).element_size()
        stored = sum(kv_heads * (k + v) * elt for k, v in self.sizes)
        real = sum(kv_heads * (qk + vo) * elt for qk, vo in zip(self.real_qk, self.real_vo))
        dense = len(self.real_qk) * kv_heads * 2 * original_head_dim(config) * elt
        name = self.backend.get_name()
        if stored == real:
            logger.info_once("A3: attention backend %s runs the real head sizes; KV cache %d bytes/token "
                             "(dense model: %d)", name, stored, dense)
        else:
            logger.info_once(
                "A3: attention backend %s needs %s; q/k (head_dim_qk %s) are zero-padded to %s and v "
                "(head_dim_vo %s) to %s, which is exact. KV cache %d bytes/token instead of %d unpadded "
                "(dense model: %d)", name,
                "one head size for K and V, from the sizes it accepts" if not is_diffkv(self.backend)
                else "a K head size it accepts and one V size for all layers",
                _describe(self.real_qk), _describe([k for k, _ in self.sizes]), _describe(self.real_vo),
                _describe([v for _, v in self.sizes]), stored, real, dense)


def _describe(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else str(values)


class A3RotaryTable(nn.Module):
    """cos/sin of every ORIGINAL rotary pair at every position, (max_positions, head_dim/2) each, float32.

    Computed as the reference does (float32 angles ``position * inv_freq``, times the rope type's attention
    scaling); each layer gathers the pairs it kept.
    """

    def __init__(self, config, max_positions: int):
        super().__init__()
        inv_freq, scaling = compute_inv_freq(config)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        self.register_buffer("cos", angles.cos() * scaling, persistent=False)
        self.register_buffer("sin", angles.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


class A3Attention(nn.Module):
    def __init__(self, config, plan: A3AttentionPlan, layer_idx: int, cache_config=None, quant_config=None,
                 prefix: str = ""):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        tp_rank = get_tensor_model_parallel_rank()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        assert self.total_num_heads % tp_size == 0
        if self.total_num_kv_heads >= tp_size:
            assert self.total_num_kv_heads % tp_size == 0
        else:
            assert tp_size % self.total_num_kv_heads == 0
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim_qk, self.head_dim_vo, _ = layer_dims(config, layer_idx)
        self.k_size, self.v_size = plan.sizes[layer_idx]
        self.q_size = self.num_heads * self.head_dim_qk
        self.kv_size = self.num_kv_heads * self.head_dim_qk
        self.v_out = self.num_kv_heads * self.head_dim_vo
        bias = bool(getattr(config, "attention_bias", False))

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim_qk, self.total_num_heads, self.total_num_kv_heads, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj", v_head_size=self.head_dim_vo,
        )
        self.o_proj = RowParallelLinear(self.total_num_heads * self.head_dim_vo, config.hidden_size, bias=bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim_qk, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim_qk, eps=config.rms_norm_eps)
        # Kept rotary pairs of each key/value head (loaded from the checkpoint); this rank's heads only. With
        # more ranks than kv heads, each rank holds a replica of kv head rank // (tp_size / kv_heads).
        self.kv_head_start = (tp_rank * self.num_kv_heads if self.total_num_kv_heads >= tp_size
                              else tp_rank // (tp_size // self.total_num_kv_heads))
        self.register_buffer("rope_pairs", torch.arange(self.head_dim_qk // 2).repeat(self.num_kv_heads, 1),
                             persistent=False)

        self.scaling = original_head_dim(config) ** -0.5  # ORIGINAL head_dim, not head_dim_qk
        self.attn = Attention(
            self.num_heads, self.k_size, self.scaling, num_kv_heads=self.num_kv_heads, cache_config=cache_config,
            quant_config=quant_config, per_layer_sliding_window=getattr(config, "sliding_window", None),
            prefix=f"{prefix}.attn", attn_type=AttentionType.DECODER, attn_backend=plan.backend,
            head_size_v=self.v_size,
        )

    def load_rope_pairs(self, pairs: torch.Tensor) -> None:
        pairs = pairs.reshape(self.total_num_kv_heads, self.head_dim_qk // 2)
        rows = pairs[self.kv_head_start : self.kv_head_start + self.num_kv_heads]
        self.rope_pairs.copy_(rows.to(self.rope_pairs.device, self.rope_pairs.dtype))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (half-split layout) on x (tokens, kv_heads, n, head_dim_qk), written zero-padded to k_size."""
        half = self.head_dim_qk // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = x.new_zeros(*x.shape[:-1], self.k_size)
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half : 2 * half] = x2 * cos + x1 * sin
        return out

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        tokens = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.v_out], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim_qk)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim_qk)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # This layer's angles: (tokens, head_dim/2) gathered per kv head -> (tokens, kv_heads, 1, head_dim_qk/2).
        cos_all, sin_all = rope
        cos = cos_all[:, self.rope_pairs].to(q.dtype).unsqueeze(2)
        sin = sin_all[:, self.rope_pairs].to(q.dtype).unsqueeze(2)
        q = self._rotate(q.view(tokens, self.num_kv_heads, self.groups, self.head_dim_qk), cos, sin)
        k = self._rotate(k.unsqueeze(2), cos, sin)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim_vo)
        if self.v_size != self.head_dim_vo:
            v = nn.functional.pad(v, (0, self.v_size - self.head_dim_vo))
        out = self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1))
        if self.v_size != self.head_dim_vo:
            out = out.view(tokens, self.num_heads, self.v_size)[..., : self.head_dim_vo]
        output, _ = self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim_vo))
        return output


class A3MLP(nn.Module):
    """SwiGLU MLP of the layer's width, zero-padded to a multiple of MLP_WIDTH_MULTIPLE (per rank).

    A3 widths such as 1229 make GEMMs markedly slower than aligned ones (gate/up of SmolLM2 at 20%, 1024
    tokens on one CPU thread: 43 ms at 1229, 30 ms at 1232, 40 ms at the dense 1536). The padded channels have
    zero gate/up rows and zero down_proj columns: silu(0) * 0 = 0, so they add nothing (exact).
    """

    def __init__(self, config, intermediate_size: int, quant_config=None, prefix: str = ""):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"A3 vLLM model supports hidden_act='silu', got {config.hidden_act!r}")
        bias = bool(getattr(config, "mlp_bias", False))
        multiple = MLP_WIDTH_MULTIPLE * get_tensor_model_parallel_world_size()
        self.real_width = intermediate_size
        self.width = -(-intermediate_size // multiple) * multiple
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [self.width] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(self.width, config.hidden_size, bias=bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def pad(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor of this MLP, zero-padded to the padded width."""
        extra = self.width - self.real_width
        if not extra:
            return tensor
        if ".gate_proj." in name or ".up_proj." in name:  # rows (and bias entries)
            return nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, extra))
        if name.endswith(".down_proj.weight"):  # input columns; its bias has the hidden size
            return nn.functional.pad(tensor, (0, extra))
        return tensor

    def forward(self, x):
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class A3DecoderLayer(nn.Module):
    def __init__(self, config, plan: A3AttentionPlan, layer_idx: int, cache_config=None, quant_config=None,
                 prefix: str = ""):
        super().__init__()
        self.self_attn = A3Attention(config, plan, layer_idx, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = A3MLP(config, layer_dims(config, layer_idx)[2], quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, rope):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, rope)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0, "inputs_embeds": 0}
)
class A3LlamaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        plan = A3AttentionPlan(vllm_config, config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config)
        self.layers = nn.ModuleList(
            A3DecoderLayer(config, plan, i, vllm_config.cache_config, quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        max_positions = max(getattr(config, "max_position_embeddings", 0) or 0, vllm_config.model_config.max_model_len)
        self.rotary = A3RotaryTable(config, max_positions)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        rope = self.rotary(positions)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, rope)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class A3LlamaForCausalLM(nn.Module):
    """vLLM model for ``A3LlamaForCausalLM`` checkpoints (registered by :func:`optimum_a3.integrations.vllm.register`)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError("the A3 vLLM model does not support pipeline parallelism")
        config = vllm_config.model_config.hf_config
        self.config = config
        quant_config = vllm_config.quant_config
        self.model = A3LlamaModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                      prefix=_join(prefix, "lm_head"))
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        tied = getattr(self.config, "tie_word_embeddings", False)
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(".inv_freq") or (tied and name.startswith("lm_head.")):
                continue
            if name.endswith(".rope_pairs"):
                modules[name.rsplit(".", 1)[0]].load_rope_pairs(tensor)
                continue
            if ".mlp." in name:
                tensor = modules[name.split(".mlp.")[0] + ".mlp"].pad(name, tensor)
            for fused, original, shard in _STACKED_PARAMS:
                if original in name:
                    target = name.replace(original, fused)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    raise KeyError(f"unexpected tensor in the A3 checkpoint: {name}")
                target = name
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def kv_cache_bytes_per_token(kv_cache_config) -> float:
    """KV cache bytes per token of all layers as vLLM allocated them, from its ``KVCacheConfig``.

    Layers of different page sizes share one buffer (each ``KVCacheTensor`` then reports the whole buffer
    as its size, and its layers' ``block_stride``): a block holds ``block_stride`` bytes of each layer.
    """
    block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    per_block = 0.0
    for tensor in kv_cache_config.kv_cache_tensors:
        if getattr(tensor, "block_stride", None):
            per_block += tensor.block_stride * len(tensor.layers)
        else:
            per_block += tensor.size / kv_cache_config.num_blocks
    return per_block / block_size


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


__all__ = ["A3LlamaForCausalLM", "A3LlamaModel", "attention_head_sizes", "kv_cache_bytes_per_token", "layer_dims"]
