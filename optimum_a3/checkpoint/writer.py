"""The one way an A3 checkpoint is written, whether the model is in memory or streamed layer by layer.

Weights go through a :class:`~optimum_a3.checkpoint.shards.ShardWriter` (the in-memory model's tensors all at
once, a streamed run's layer by layer), then :func:`write_checkpoint_files` writes what ``save_pretrained``
writes besides the weights, plus the tokenizer and the model card. Both routes therefore give the same
files, byte for byte.
"""

from __future__ import annotations

from torch import nn

from ..math.budget import total_params
from .model_card import write_model_card
from .saving import save_tokenizer
from .shards import ShardWriter
from .weight_checks import check_tensors_written


def stored_tensors(model: nn.Module) -> dict:
    """The tensors a checkpoint stores: the state dict without a tied lm_head (it is the embedding)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_model(model: nn.Module, directory: str, tokenizer=None, max_shard_size: int | str = "5GB") -> None:
    """Write ``model`` (an A3 model in memory) as a checkpoint into ``directory`` (existing, empty)."""
    tensors = stored_tensors(model)
    check_tensors_written(tensors)
    shards = ShardWriter(directory, max_shard_size)
    shards.add(tensors)
    write_checkpoint_files(model, directory, tokenizer, shards)


def write_checkpoint_files(model: nn.Module, directory: str, tokenizer, shards: ShardWriter) -> None:
    """Name the weight shards (and write their index), then the config (with ``auto_map``), the remote code,
    the generation config, the tokenizer and the model card."""
    from transformers.dynamic_module_utils import custom_object_save


    shards.finish(total_parameters=total_params(model))
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)
    write_model_card(model, directory)
