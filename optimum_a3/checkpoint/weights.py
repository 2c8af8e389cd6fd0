"""Read a checkpoint without holding the whole model: tensors by name, decoder layers one at a time.

``CheckpointWeights`` reads tensors by name from a safetensors checkpoint (one file or an index of
shards); ``empty_model`` builds the model on the meta device; ``LazyLayers`` materialises one decoder layer
of it at a time and drops it after use. With :class:`optimum_a3.checkpoint.shards.ShardWriter` on the
output side they bound the peak memory of streamed compression by one layer of weights plus its float64
statistics plus the calibration activations plus one output shard.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import sys
from collections import defaultdict

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import one_line
from .loading import ModelLoadError, check_config_describes_weights, load_checked_config, remote_code_refused
from .shards import INDEX_FILE, SINGLE_FILE
from .weight_checks import check_weights_read


def return_large_frees_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Ask glibc to serve allocations above ``threshold_bytes`` with mmap, so freeing them returns the
    memory to the OS at once (Linux/glibc only; a no-op elsewhere). Returns whether it was applied.

    glibc raises its mmap threshold after large frees, after which activation-sized tensors come from
    the heap and freed holes stay resident: measured on SmolLM2 streaming 8 x 2048 tokens, resident
    memory grew by ~40 MB per layer instead of the ~11 MB of output it holds. A fixed threshold keeps it
    flat. It is process-wide and costs a page-zeroing mmap per large allocation.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # from malloc.h
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False


def resolve_checkpoint_dir(spec: str, revision: str | None = None) -> str:
    """A local directory as is; a Hub id is downloaded (config, tokenizer and safetensors only)."""
    if os.path.isdir(spec):
        return spec
    if spec.endswith(".gguf") or os.path.isfile(spec):
        raise ModelLoadError(f"{spec}: streaming needs a safetensors checkpoint (a directory or a Hub id)")
    from huggingface_hub import snapshot_download

    return snapshot_download(spec, revision=revision, allow_patterns=[
        "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.py", "*.jinja"])


def has_safetensors(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in (SINGLE_FILE, INDEX_FILE))


class CheckpointWeights:
    """Tensors of a safetensors checkpoint, read by name without loading the rest."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            self.weight_map: dict[str, str] = _read_weight_map(index)
        elif os.path.isfile(single):
            with self._open(SINGLE_FILE) as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise ModelLoadError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}: streaming needs safetensors weights")

    @contextlib.contextmanager
    def _open(self, file: str):
        """``safe_open`` of one weight file; a damaged or missing one is a :class:`ModelLoadError` naming it."""
        path = os.path.join(self.directory, file)
        try:
            with safe_open(path, framework="pt") as f:
                yield f
        except SafetensorError as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({one_line(exc)}): "
                                 "it is truncated or damaged; download or copy it again") from None
        except FileNotFoundError:
            raise ModelLoadError(f"{path} is missing (listed in {INDEX_FILE})") from None

    def _by_file(self, names: list[str]) -> dict[str, list[str]]:
        by_file = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        return by_file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers (no tensor data); opening every file also
        finds a truncated or damaged one before any work."""
        shapes = {}
        for file, file_names in self._by_file(list(self.weight_map)).items():
            with self._open(file) as f:
                for name in file_names:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return shapes

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read ``names`` (opening each shard once), cast to ``dtype``; a missing name is an error."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ModelLoadError(f"{self.directory}: tensors missing from the checkpoint: {missing[:5]}")
        out = {}
        for file, file_names in self._by_file(names).items():
            with self._open(file) as f:
                for name in file_names:
                    tensor = f.get_tensor(name)
                    out[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        return out


def _read_weight_map(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            return json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a safetensors index (a JSON object with a weight_map): "
                             f"{type(exc).__name__}: {exc}") from None


def empty_model(directory: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``directory`` with parameters on the meta device (buffers such as RoPE frequencies
    stay real), in eval mode. Only the weight files' headers are read: a config.json that does not
    describe them (a missing key left to transformers' default, fewer layers than the shards hold) and
    a damaged file are refused with :class:`ModelLoadError` (see
    :func:`optimum_a3.checkpoint.loading.check_config_describes_weights`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config, config_dict = load_checked_config(directory, trust_remote_code)
    with remote_code_refused(directory):
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as from_pretrained does: a tied lm_head is then no tensor of its own
    if has_safetensors(directory):
        check_config_describes_weights(model, CheckpointWeights(directory).shapes(), config_dict, directory)
    model.config._name_or_path = directory
    return model.eval()


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the real (non-meta) buffers of an empty model, e.g. RoPE frequencies, to ``device``."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)


def materialize(module: nn.Module, prefix: str, weights: CheckpointWeights, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> None:
    """Give ``module`` (named ``prefix`` in the checkpoint) its weights from the checkpoint."""
    names = list(module.state_dict().keys())
    tensors = weights.load([prefix + n for n in names], dtype)
    module.to_empty(device=device)
    module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True)


class LazyLayers:
    """Decoder layers of an empty model, materialised on demand from the checkpoint and released after.

    ``load`` and ``release`` are idempotent.
    """

    def __init__(self, layers: nn.ModuleList, prefix: str, weights: CheckpointWeights, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.layers, self.prefix, self.weights = layers, prefix, weights
        self.dtype, self.device = dtype, device
        self.loaded: set[int] = set()

    def load(self, idx: int) -> None:
        if idx not in self.loaded:
            materialize(self.layers[idx], f"{self.prefix}{idx}.", self.weights, self.dtype, self.device)
            self.loaded.add(idx)
            check_weights_read(self.layers[idx], f"{self.prefix}{idx}.")

    def get(self, idx: int) -> nn.Module:
        """Layer ``idx``, read from the checkpoint if it is not in memory."""
        self.load(idx)
        return self.layers[idx]

    def release(self, idx: int) -> None:
        if idx in self.loaded:
            self.layers[idx].to("meta")
            self.loaded.discard(idx)

    def release_all(self) -> None:
        for idx in list(self.loaded):
            self.release(idx)


def streamed_model(directory: str, dtype: torch.dtype | None, device: torch.device,
                   trust_remote_code: bool = False) -> tuple[nn.Module, LazyLayers]:
    """The model of ``directory`` ready to be compressed layer by layer: on the meta device but for its
    buffers and input embeddings (materialised on ``device``), and its decoder layers as
    :class:`LazyLayers`. ``dtype`` defaults to the checkpoint's (``config.dtype``), else float32.
    Unsupported architectures are refused before any weight is read."""
    from ..models.adapters import adapter_for

    model = empty_model(directory, dtype or torch.float32, trust_remote_code)
    if dtype is None and isinstance(getattr(model.config, "dtype", None), torch.dtype):
        model = empty_model(directory, model.config.dtype, trust_remote_code)
    layers = adapter_for(model).layers(model)
    weights = CheckpointWeights(directory)
    move_buffers(model, device)
    names = {module: name for name, module in model.named_modules()}
    embeddings = model.get_input_embeddings()
    materialize(embeddings, names[embeddings] + ".", weights, model.dtype, device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # lm_head shares the materialised embedding again (counted once)
    return model, LazyLayers(layers, names[layers] + ".", weights, model.dtype, device)
