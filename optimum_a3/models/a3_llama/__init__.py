"""A3-compressed Llama-family models (model_type ``a3_llama``)."""

from .configuration_a3_llama import A3LlamaConfig
from .modeling_a3_llama import A3LlamaForCausalLM, A3LlamaModel, A3LlamaPreTrainedModel

__all__ = ["A3LlamaConfig", "A3LlamaForCausalLM", "A3LlamaModel", "A3LlamaPreTrainedModel"]
