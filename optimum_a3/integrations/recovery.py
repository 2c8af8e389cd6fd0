"""Optional recovery fine-tune of an A3 model: LoRA (``peft``, merged back) or the A3 weights themselves,
on the next-token loss or distilled from the dense model's logits.

A3 is training-free; a short fine-tune on plain text recovers part of the perplexity it costs. LoRA
adapters are merged into the weights (``merge_and_unload``), so either way the result is a plain A3 model
with the same dims and ``rope_pairs``: it saves, reloads and quantizes like any A3 checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.adapters import adapter_for
from ..calibration.windows import CalibrationDataError, calibration_windows
from ..calibration.text import describe_source
from ..errors import A3Error
from .quantization import quantized_backend
from ..checkpoint.records import RecordError, compression_record, quantization_record, update_compression_record


class RecoveryError(A3Error, ValueError):
    """Bad recovery settings, a model that is not a float A3 model, or too little training text."""


RECOVERY_METHODS = ("lora", "weights")
# "weights": on SmolLM2 at 20%, 300 steps distilled from the dense model, 1e-4 beat 3e-5 and 3e-4 (README).
DEFAULT_LEARNING_RATES = {"lora": 3e-4, "weights": 1e-4}


def recover(model: nn.Module, tokenizer=None, dataset: Any = "wikipedia-offline", steps: int = 300, *,
            method: str = "lora", teacher: nn.Module | None = None, temperature: float = 1.0, rank: int = 8,
            alpha: float | None = None, learning_rate: float | None = None, seqlen: int = 256, batch_size: int = 1,
            warmup_steps: int | None = None, seed: int = 0, target_modules: Sequence[str] | None = None,
            train_ids: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None,
            progress: bool = True) -> nn.Module:
    """Fine-tune a copy of an A3 model on text and return it, with the same dims (a plain A3 model).

    Every step uses ``batch_size`` fresh, non-overlapping windows of ``seqlen`` tokens (no window is seen
    twice), sampled from ``dataset`` with ``seed`` and visited in a seeded random order; dropout is off, so a
    run is reproducible with the same seed and thread count. The input model is left unchanged. The run is
    recorded in ``config.a3_compression["recovery"]`` (settings and mean training loss over the first and
    last steps).

    Args:
        model: a float A3 model (from ``A3Compressor.compress`` or a reloaded A3 checkpoint).
        tokenizer: tokenizes ``dataset`` (not needed with ``train_ids``).
        dataset: training text, any source ``A3Config.dataset`` accepts (default: the offline Wikipedia).
        steps: optimizer steps.
        method: what is trained. ``"lora"``: LoRA adapters (``peft``) on ``target_modules``, merged back
            (``merge_and_unload``). ``"weights"``: the weights (and biases) of ``target_modules`` themselves:
            A3's projections are small, so they can be trained directly (AdamW keeps two moments per weight).
        teacher: a model with the same vocabulary, e.g. the dense model the A3 model was compressed from.
            With it the objective is knowledge distillation, ``T² · KL(teacher ‖ student)`` of the next-token
            distributions at temperature ``T = temperature``, on every position; without it, the next-token
            loss on the text.
        temperature: the distillation temperature (only with ``teacher``).
        rank / alpha: LoRA rank and scaling numerator (default ``alpha = 2 * rank``; ``method="lora"`` only).
        learning_rate: AdamW peak learning rate (linear warm-up, then cosine decay to zero); default
            ``DEFAULT_LEARNING_RATES[method]``.
        seqlen / batch_size: tokens per window, windows per step.
        warmup_steps: default 10% of ``steps``.
        seed: seed of the window sampling, their order and the LoRA initialisation.
        target_modules: names of the linear layers that are trained (peft ``target_modules`` for LoRA).
            Default: every projection A3 resizes, as the model family's adapter names them
            (``lora_targets``); lm_head and the embeddings stay frozen (tied, and the largest matrices).
        train_ids: ``(n, seqlen)`` token ids used instead of ``dataset`` (at least ``steps * batch_size`` rows).
        autocast_dtype: run forward and backward under ``torch.autocast`` in this dtype (e.g.
            ``torch.bfloat16``: about 2x faster on CPUs with AVX512-BF16); weights, adapters and optimizer
            stay in the model's dtype. Default: no autocast.
        progress: show a progress bar with the running loss.

    Raises:
        RecoveryError: not an A3 model, a quantized model, a teacher with another vocabulary, bad settings,
            or too little text for ``steps * batch_size`` windows.
    """
    _check_model(model)
    check_recovery_settings(method, steps, rank=rank, learning_rate=learning_rate, seqlen=seqlen,
                            batch_size=batch_size, warmup_steps=warmup_steps, temperature=temperature)
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATES[method]
    if target_modules is None:
        target_modules = adapter_for(model, validate=False).lora_targets()
    _check_teacher(model, teacher)
    windows, source = _training_windows(tokenizer, dataset, train_ids, steps * batch_size, seqlen, seed)

    torch.manual_seed(seed)  # the LoRA A matrices are initialised at random
    if method == "lora":
        trained = _with_lora(copy.deepcopy(model), target_modules, rank, alpha)
    else:
        trained = _with_trainable_weights(copy.deepcopy(model), target_modules)
    losses = _train(trained, windows, steps, batch_size, learning_rate,
                    max(1, steps // 10) if warmup_steps is None else warmup_steps, autocast_dtype, progress,
                    teacher, temperature)
    result = (trained.merge_and_unload() if method == "lora" else trained).eval()
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in result.named_parameters():  # hand back the input's flags (training froze or unfroze some)
        p.requires_grad_(trainable.get(name, True))
    head = max(1, min(10, steps // 10))
    record = {"method": method, "target_modules": list(target_modules), "steps": steps, "batch_size": batch_size,
              "seqlen": seqlen, "learning_rate": learning_rate, "dataset": source,
              "tokens": steps * batch_size * seqlen, "seed": seed,
              "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
              "objective": "next-token" if teacher is None else "distillation",
              "loss_first_steps": sum(losses[:head]) / head, "loss_last_steps": sum(losses[-head:]) / head}
    if method == "lora":
        record.update(rank=rank, alpha=alpha if alpha is not None else 2 * rank, peft_version=_peft_version())
    if teacher is not None:
        record.update(teacher=str(getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__),
                      temperature=temperature)
    update_compression_record(result.config, evaluation=None, recovery=record)  # evaluation: of the weights before
    return result


def recover_with_lora(model: nn.Module, tokenizer=None, dataset: Any = "wikipedia-offline", steps: int = 300,
                      rank: int = 8, alpha: float | None = None, learning_rate: float = 3e-4, seqlen: int = 256,
                      batch_size: int = 1, warmup_steps: int | None = None, seed: int = 0,
                      target_modules: Sequence[str] | None = None, train_ids: torch.Tensor | None = None,
                      autocast_dtype: torch.dtype | None = None, progress: bool = True,
                      teacher: nn.Module | None = None, temperature: float = 1.0) -> nn.Module:
    """:func:`recover` with ``method="lora"``, the arguments in their earlier order. The defaults are those
    measured on SmolLM2-135M (300 steps x 256 tokens took 312 s on 2 CPU cores with
    ``autocast_dtype=torch.bfloat16``)."""
    return recover(model, tokenizer, dataset, steps, method="lora", teacher=teacher, temperature=temperature,
                   rank=rank, alpha=alpha, learning_rate=learning_rate, seqlen=seqlen, batch_size=batch_size,
                   warmup_steps=warmup_steps, seed=seed, target_modules=target_modules, train_ids=train_ids,
                   autocast_dtype=autocast_dtype, progress=progress)


def lm_loss(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 1) -> float:
    """Mean next-token loss (nats) of ``model`` on ``(n, seqlen)`` token ids, e.g. the training windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, token_ids.shape[0], batch_size):
            batch = token_ids[start:start + batch_size]
            total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * batch.shape[0]
            count += batch.shape[0]
    return total / count


# ------------------------------------------------------------------------------------ checks
def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    # By model_type, not class: a checkpoint reloaded with trust_remote_code has its own class object.
    try:
        record = compression_record(config)
        quantized = quantization_record(config) is not None
    except RecordError as exc:
        raise RecoveryError(str(exc)) from exc
    if getattr(config, "model_type", None) != "a3_llama" or record is None:
        raise RecoveryError(f"recovery expects an A3 model (from A3Compressor.compress or a saved A3 "
                            f"checkpoint), got {type(model).__name__} (model_type "
                            f"{getattr(config, 'model_type', None)!r})")
    if quantized or quantized_backend(model) is not None:
        raise RecoveryError("the model is quantized: fine-tune the float A3 model, then quantize the result "
                            "(merging adapters into quantized weights would re-quantize them)")
    if not any(p.is_floating_point() for p in model.parameters()):
        raise RecoveryError("the model has no floating-point parameters to fine-tune")


def check_recovery_settings(method: str = "lora", steps: int = 300, *, rank: int = 8,
                            learning_rate: float | None = None, seqlen: int = 256, batch_size: int = 1,
                            warmup_steps: int | None = None, temperature: float = 1.0) -> None:
    """Refuse bad :func:`recover` settings with a :class:`RecoveryError`, before any model is loaded.

    ``recover`` calls it too; the CLI calls it first so that a bad ``--steps`` does not wait for a model load.
    """
    if method not in RECOVERY_METHODS:
        raise RecoveryError(f"method must be one of {', '.join(map(repr, RECOVERY_METHODS))}, got {method!r}")
    for name, value in (("steps", steps), ("rank", rank), ("seqlen", seqlen), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecoveryError(f"{name} must be an integer >= 1, got {value!r}")
    if seqlen < 2:
        raise RecoveryError(f"seqlen must be >= 2 (one token predicts the next), got {seqlen}")
    # None: the method's default rate (DEFAULT_LEARNING_RATES), which recover() fills in.
    if learning_rate is not None and not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate)
                                          and learning_rate > 0):
        raise RecoveryError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if warmup_steps is not None and not (0 <= warmup_steps < steps):
        raise RecoveryError(f"warmup_steps must be in [0, steps={steps}), got {warmup_steps}")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise RecoveryError(f"temperature must be a positive number, got {temperature!r}")


def _check_teacher(model: nn.Module, teacher: nn.Module | None) -> None:
    if teacher is None:
        return
    if teacher is model:
        raise RecoveryError("the teacher is the model being fine-tuned: pass the dense model it was compressed from")
    vocab, teacher_vocab = model.config.vocab_size, getattr(getattr(teacher, "config", None), "vocab_size", None)
    if teacher_vocab != vocab:
        raise RecoveryError(f"the teacher's vocabulary ({teacher_vocab}) is not the model's ({vocab}): distillation "
                            f"compares next-token distributions, so both must share one tokenizer")


def _training_windows(tokenizer, dataset, train_ids, needed: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    if train_ids is not None:
        ids = torch.as_tensor(train_ids, dtype=torch.long)
        if ids.dim() != 2 or ids.shape[1] != seqlen:
            raise RecoveryError(f"train_ids must have shape (n, seqlen={seqlen}), got {tuple(ids.shape)}")
        if ids.shape[0] < needed:
            raise RecoveryError(f"train_ids has {ids.shape[0]} windows, the run needs steps x batch_size = {needed}")
        return ids[:needed], "user-provided token ids"
    if tokenizer is None:
        raise RecoveryError("a tokenizer is needed to train on text (or pass train_ids)")
    try:
        windows = calibration_windows(tokenizer, dataset, needed, seqlen, seed)
    except CalibrationDataError as exc:
        raise RecoveryError(f"too little training text for {needed} windows of {seqlen} tokens (steps x "
                            f"batch_size): lower steps, batch_size or seqlen, or give more text ({exc})") from exc
    # The windows come back in text order; training on them in that order would end the cosine schedule on
    # one stretch of the corpus (a few articles), so the steps visit them in a seeded random order.
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order], describe_source(dataset)


# ----------------------------------------------------------------------------------- training
def _with_lora(model: nn.Module, target_modules: Sequence[str], rank: int, alpha: float | None) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise RecoveryError("LoRA recovery needs peft: pip install 'optimum-a3[quant]' (or method='weights')") from exc
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                                            lora_dropout=0.0, target_modules=list(target_modules), bias="none"))


def _with_trainable_weights(model: nn.Module, target_modules: Sequence[str]) -> nn.Module:
    """Freeze everything but the weights and biases of the linear layers named ``target_modules``."""
    names = set(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    found = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in names:
            for p in module.parameters():
                p.requires_grad_(True)
            found += 1
    if not found:
        raise RecoveryError(f"no linear layer is named like target_modules {sorted(names)}")
    return model


def _distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` per position, averaged (T² keeps the gradient scale of T = 1)."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    target = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (target.exp() * (target - student)).sum(-1).mean() * temperature ** 2


def _train(model, windows: torch.Tensor, steps: int, batch_size: int, learning_rate: float, warmup_steps: int,
           autocast_dtype: torch.dtype | None, progress: bool, teacher: nn.Module | None = None,
           temperature: float = 1.0) -> list[float]:
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    device = next(model.parameters()).device
    if teacher is not None:
        was_training = teacher.training
        teacher.eval()
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="recovery fine-tune", unit="step", disable=not progress)
    start = time.perf_counter()
    try:
        for step in bar:
            batch = windows[step * batch_size:(step + 1) * batch_size].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if teacher is None:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                else:
                    with torch.no_grad():
                        target = teacher(input_ids=batch, use_cache=False).logits
                    loss = _distillation_loss(model(input_ids=batch, use_cache=False).logits, target, temperature)
            if not torch.isfinite(loss):
                raise RecoveryError(f"the training loss became {loss.item()} at step {step}: lower learning_rate")
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", s_per_step=f"{(time.perf_counter() - start) / (step + 1):.1f}")
    finally:
        bar.close()
        model.eval()
        if teacher is not None:
            teacher.train(was_training)
    return losses


def _peft_version() -> str:
    from importlib.metadata import version

    return version("peft")
