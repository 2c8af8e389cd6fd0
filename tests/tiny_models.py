"""Tiny random models built inside the tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_llama(num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16, hidden: int = 48,
               intermediate: int = 96, layers: int = 2, vocab: int = 128, tie: bool = True,
               seed: int = 0, dtype: torch.dtype = torch.float32, family: str = "llama",
               rms_norm_eps: float = 1e-6, random_norms: bool = False, **extra):
    """A random Llama-architecture causal LM; GQA by default, MHA with ``num_kv_heads=num_heads``.

    ``family="qwen2"`` (q/k/v biases) or ``"qwen3"`` (q/k RMSNorm) builds those architectures instead;
    biases and norm weights are random too, so that carrying them wrongly is visible.
    ``random_norms=True`` also draws the layer-norm weights (input, post-attention, final; default 1.0)
    from U(0.5, 1.5); with ``rms_norm_eps`` and RoPE settings (``rope_parameters=...``) that differ from
    the defaults, a compressed config or checkpoint that loses them is visible in the logits.
    """
    torch.manual_seed(seed)
    config_class, model_class = FAMILIES[family]
    config = config_class(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=rms_norm_eps,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )
    model = model_class(config).to(dtype)
    # Larger-than-default init so attention patterns are not uniform and errors are visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
            elif random_norms and "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def random_token_windows(n: int, seqlen: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seqlen), generator=g)


def tiny_tokenizer(vocab: int = 128):
    """A character-level fast tokenizer with ``vocab`` ids (0 pad, 1 bos, 2 eos, 3 unk), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab - 4]
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
