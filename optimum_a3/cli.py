"""Command line: ``optimum-a3 compress | eval | push | quantize | recover``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

COMPRESS_EXAMPLES = """\
  # compress the embedded offline SmolLM2 by 20%, report perplexity before and after, save the checkpoint
  optimum-a3 compress smollm2-offline --ratio 0.2 --output outputs/smollm2-a3-20 --eval wikitext2

  # calibrate on a Hub dataset and publish the result (repo created if needed, one commit, model card included)
  optimum-a3 compress meta-llama/Llama-3.1-8B --ratio 0.2 --output llama31-a3-20 \\
      --dataset hub:DKYoon/SlimPajama-6B::train --push-to-hub my-org/Llama-3.1-8B-A3-20
"""
EVAL_EXAMPLES = """\
  # perplexity of a saved checkpoint (a directory, a Hub id or a .gguf file)
  optimum-a3 eval outputs/smollm2-a3-20 --source wikitext2 --eval-windows 8
"""
PUSH_EXAMPLES = """\
  # publish a saved checkpoint
  optimum-a3 push outputs/smollm2-a3-20 my-org/SmolLM2-135M-A3-20 --private
"""
QUANTIZE_EXAMPLES = """\
  # 4-bit HQQ (group 64) of a saved A3 checkpoint, bf16 scales and embeddings, perplexity after
  optimum-a3 quantize outputs/smollm2-a3-20 --output outputs/smollm2-a3-20-hqq4 --eval wikitext2 --eval-windows 12

  # optimum-quanto int4 instead (safetensors; quanto picks the group size)
  optimum-a3 quantize outputs/smollm2-a3-20 --output outputs/smollm2-a3-20-quanto4 --backend quanto

  Reload in Python with optimum_a3.integrations.quantization.load_quantized(DIR).
"""
RECOVER_EXAMPLES = """\
  # 300 LoRA steps (rank 8) on the offline Wikipedia text, merged, saved as a plain A3 checkpoint
  optimum-a3 recover outputs/smollm2-a3-20 --output outputs/smollm2-a3-20-lora --steps 300 \\
      --eval wikitext2 --eval-windows 12

  # the A3 weights themselves, distilled from the dense model's next-token distributions
  optimum-a3 recover outputs/smollm2-a3-20 --output outputs/smollm2-a3-20-kd --train weights \\
      --teacher smollm2-offline --steps 300 --bf16-autocast
"""
HUB_NOTE = """
The Hub token is --token, else HF_TOKEN, else the one saved by `hf auth login`; HF_ENDPOINT selects the Hub.
A compressed model loads anywhere with plain transformers:
  AutoModelForCausalLM.from_pretrained("my-org/SmolLM2-135M-A3-20", trust_remote_code=True)
"""
EXAMPLES = ("examples:\n" + COMPRESS_EXAMPLES + "\n" + EVAL_EXAMPLES + "\n" + PUSH_EXAMPLES + "\n" + QUANTIZE_EXAMPLES
            + "\n" + RECOVER_EXAMPLES + HUB_NOTE)

DESCRIPTION = """\
Compress causal LMs with A3 (analytical low-rank, arXiv 2505.12942) into smaller dense models,
evaluate them, and publish them on the Hugging Face Hub. Run `optimum-a3 COMMAND --help` for a
command's options."""


def _wrap(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=100)


def _factor_or_none(text: str) -> float | str:
    """``--max-dim-factor``: a number, or ``"none"`` for no bound (a bad number is A3Config's to refuse)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (default 2048, the paper's)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward pass")


def _add_command(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help shows ``description`` (re-wrapped) and ``examples`` verbatim."""
    return sub.add_parser(name, help=help, description=_wrap(description), epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, help="directory to write (must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _add_trust_remote_code_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with MODEL (a config.json `auto_map`); off by default, and A3 "
                        "checkpoints do not need it: this library loads them itself")


def _add_hub_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--token", default=None,
                   help="Hub write token (default: HF_TOKEN or the saved `hf auth login` token)")
    p.add_argument("--private", action="store_true", help="create the repository as private (if it does not exist)")
    p.add_argument("--commit-message", default=None, help="message of the upload commit")
    p.add_argument("--license", default=None,
                   help="license of the model card (default: the base model's when it can be found)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-a3", description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = _add_command(sub, "compress", "compress a model and save it (reloadable with trust_remote_code=True)",
                     "Compress MODEL with A3 and save the result to --output: safetensors weights, config with "
                     "auto_map, the self-contained modeling code and the tokenizer. Give --ratio, or explicit dims. "
                     "With --push-to-hub the checkpoint is then uploaded with a model card.",
                     COMPRESS_EXAMPLES + HUB_NOTE)
    c.add_argument("model", help="hub id, local directory, .gguf file, or 'smollm2-offline' (the embedded default)")
    _add_output_options(c)
    _add_trust_remote_code_option(c)
    c.add_argument("--device", default=None, help="device for calibration and solvers (default: the model's)")
    c.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the model one decoder layer at a time from its safetensors shards and write the "
                        "output layer by layer (default: on for safetensors checkpoints unless --eval is given)")
    c.add_argument("--stats-cache", metavar="DIR", default=None,
                   help="cache calibration statistics in DIR; a later run on the same model and data (any ratio) "
                        "skips the calibration forward (needs --method paper or --no-sequential)")
    c.add_argument("--max-shard-size", default="5GB", help="largest weight file written (default 5GB)")
    size = c.add_argument_group("how much to compress")
    size.add_argument("--ratio", type=float, help="fraction of decoder-layer parameters to remove, in [0, 1)")
    size.add_argument("--head-dim-qk", type=int, help="explicit q/k head dim (even with RoPE)")
    size.add_argument("--head-dim-vo", type=int, help="explicit v/o head dim")
    size.add_argument("--intermediate-size", type=int, help="explicit MLP width")
    size.add_argument("--components", default="qk,ov,mlp", help="comma-separated subset of qk,ov,mlp (default all)")
    size.add_argument("--method", choices=["default", "paper", "quality"], default="default",
                      help="'paper' reproduces arXiv 2505.12942 exactly; 'default' adds sequential calibration and "
                           "the measured mixed allocation, cheaply priced; 'quality' adds the teacher refit and prices "
                           "the allocation on more tokens (README, Beyond the paper)")
    size.add_argument("--allocation", choices=["uniform", "mixed"], default=None,
                      help="same dims in every layer, or per-layer dims under the same budget (default: the method's, "
                           "mixed except for --method paper, explicit dims or --low-memory)")
    size.add_argument("--sensitivity-tokens", type=int, default=None,
                      help="--allocation mixed: calibration tokens on which each layer's components are probed "
                           "(default: the method's, 64 or 1024 with --method quality; 0: analytical errors alone)")
    size.add_argument("--allocation-windows", type=int, default=None, metavar="N",
                      help="--allocation mixed with sequential calibration: the first pass, which prices the dims, "
                           "takes the first N calibration windows (default: the method's, 1 or 0 with --method "
                           "quality; 0: all)")
    size.add_argument("--cap-kv-dims", action="store_true",
                      help="--allocation mixed: keep the q/k and v/o head dims at most the uniform ones, so the KV "
                           "cache is at most the uniform model's (costs perplexity, README)")
    size.add_argument("--max-dim-factor", type=_factor_or_none, default=None, metavar="F",
                      help="--allocation mixed: keep every dim within F times its uniform dim, and at least 1/F "
                           "of it (F >= 1; default 1.5; 'none': no bound)")
    size.add_argument("--mlp-refit", action=argparse.BooleanOptionalAction, default=None,
                      help="least-squares refit of down_proj after channel selection (beyond the paper; lower "
                           "perplexity; on in --method default unless --teacher-refit is given; --no-mlp-refit turns "
                           "it off)")
    size.add_argument("--refit-stride", type=int, default=None, metavar="N",
                      help="--mlp-refit with sequential calibration: its statistic takes every Nth calibration token "
                           "(default: the method's, 4 with --method default, lowered on small calibration sets; "
                           "1: every token)")
    size.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                      help="calibrate each layer on the output of the already compressed model (beyond the paper; on by "
                           "default)")
    size.add_argument("--teacher-refit", action=argparse.BooleanOptionalAction, default=None,
                      help="refit o_proj and down_proj so each compressed layer gives the original model's outputs "
                           "(needs sequential calibration; on with --method quality)")
    size.add_argument("--hold-mlp-intermediate", action=argparse.BooleanOptionalAction, default=True,
                      help="sequential calibration only: hold each layer's gate/up output (tokens x intermediate_size) "
                           "so the compressed MLP runs only down_proj; --no-hold-mlp-intermediate saves that memory "
                           "for more time (same model)")
    calib = c.add_argument_group("calibration data")
    calib.add_argument("--dataset", default="wikipedia-offline",
                       help="calibration text: wikipedia-offline (default), a .txt/.jsonl/.json/.parquet file, "
                            "or hub:NAME[:CONFIG[:SPLIT]]")
    calib.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128, the paper's)")
    calib.add_argument("--seqlen", type=int, default=2048, help="calibration window length in tokens (default 2048)")
    calib.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward pass")
    calib.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    ev = c.add_argument_group("evaluation (recorded in the checkpoint and its model card)")
    _add_eval_after_options(ev, "also report perplexity before and after on SOURCE "
                                "(e.g. wikitext2, wikipedia-offline:heldout)")
    hub = c.add_argument_group("publishing")
    hub.add_argument("--push-to-hub", metavar="REPO", default=None,
                     help="after saving, upload the checkpoint to the Hub repo REPO (namespace/name); the token is "
                          "checked before compressing")
    _add_hub_options(hub)

    e = _add_command(sub, "eval", "perplexity (or lm-eval task accuracy with --tasks) of a model",
                     "Perplexity of MODEL on non-overlapping windows of SOURCE (the GPTQ / SVD-LLM / A3 protocol); "
                     "with --tasks, lm-evaluation-harness accuracy on those tasks instead (acc, acc_norm; needs "
                     "the 'eval' extra), of MODEL and optionally of --base. "
                     "A3 checkpoints load with this library's own model class, quantized ones (`optimum-a3 "
                     "quantize`) with optimum_a3.integrations.quantization.load_quantized; code shipped with a model runs only "
                     "with --trust-remote-code.", EVAL_EXAMPLES + ZERO_SHOT_EXAMPLES)
    e.add_argument("model", help="compressed checkpoint directory, hub id, .gguf file or 'smollm2-offline'")
    e.add_argument("--source", default="wikitext2",
                   help="wikitext2 (local ../shared file first, then datasets), wikitext2:PATH, a text file, "
                        "or wikipedia-offline:heldout")
    _add_eval_options(e)
    _add_trust_remote_code_option(e)
    _add_zero_shot_options(e)

    p = _add_command(sub, "push", "upload a saved compressed checkpoint to the Hub",
                     "Upload the checkpoint in DIRECTORY (written by `optimum-a3 compress`, `optimum-a3 quantize`, "
                     "A3Compressor.save or save_quantized) to the Hub repo REPO in one commit: weights, config, "
                     "modeling code, tokenizer and a model card rendered from the compression (and quantization) "
                     "record (a README.md you wrote yourself is kept). The repo is created if needed; nothing is "
                     "published if the push fails.", PUSH_EXAMPLES + HUB_NOTE)
    p.add_argument("directory", help="checkpoint directory")
    p.add_argument("repo_id", metavar="REPO", help="Hub repo id, namespace/name")
    _add_hub_options(p)

    q = _add_command(sub, "quantize", "4-bit weight quantization of a (compressed) checkpoint (hqq or optimum-quanto)",
                     "Quantize the decoder linears of MODEL (an A3 checkpoint or any causal LM) and save it in the "
                     "backend's format, with a model card saying how to load it (optimum_a3.integrations.quantization.load_quantized, "
                     "`optimum-a3 eval`); `optimum-a3 push` publishes it. Needs the 'quant' extra.", QUANTIZE_EXAMPLES)
    q.add_argument("model", help="checkpoint directory, hub id, .gguf file or 'smollm2-offline'")
    _add_output_options(q)
    _add_trust_remote_code_option(q)
    q.add_argument("--backend", choices=["hqq", "quanto"], default="hqq", help="hqq (default, any group size) or quanto")
    q.add_argument("--bits", type=int, default=4, help="weight bits (hqq 1/2/3/4/8, quanto 2/4/8; default 4)")
    q.add_argument("--group-size", type=int, default=None, help="hqq group size (default 64); not for quanto")
    q.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of scales, embeddings and compute (default bfloat16)")
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="linear layers left in float (default lm_head)")
    _add_eval_after_options(q, "report perplexity after quantization on SOURCE (e.g. wikitext2)")

    r = _add_command(sub, "recover", "short fine-tune of an A3 checkpoint (LoRA merged back, or its weights)",
                     "Fine-tune a saved A3 checkpoint on text (LoRA adapters merged back, or the projections' "
                     "weights themselves), on the next-token loss or distilled from a teacher (the dense model), "
                     "and save a plain A3 checkpoint with the same dims (reloadable with trust_remote_code=True). "
                     "LoRA needs the 'quant' extra (peft).", RECOVER_EXAMPLES)
    r.add_argument("model", help="A3 checkpoint directory or hub id")
    _add_output_options(r)
    _add_trust_remote_code_option(r)
    r.add_argument("--dataset", default="wikipedia-offline:train",
                   help="training text (any calibration source; default the offline Wikipedia)")
    r.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    r.add_argument("--train", choices=["lora", "weights"], default="lora",
                   help="what is trained: LoRA adapters, merged back (default), or the projections' weights")
    r.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distill from this model's next-token distributions (the dense model: directory, GGUF, "
                   "hub id or smollm2-offline) instead of the next-token loss")
    r.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    r.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8, the paper's)")
    r.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    r.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4 for LoRA, 1e-4 for "
                   "weights)")
    r.add_argument("--seqlen", type=int, default=256, help="tokens per training window")
    r.add_argument("--batch-size", type=int, default=1, help="windows per step")
    r.add_argument("--seed", type=int, default=0, help="seed of the window sampling and LoRA init")
    r.add_argument("--bf16-autocast", action="store_true",
                   help="forward/backward in bfloat16 autocast (about 2x faster on CPUs with AVX512-BF16)")
    _add_eval_after_options(r, "report perplexity before and after on SOURCE (e.g. wikitext2)")
    return parser


def _add_eval_after_options(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--eval", dest="eval_source", default=None, metavar="SOURCE", help=help_text)
    _add_eval_options(p)


def _ppl(model, tokenizer, source, args) -> float:
    from .integrations.evaluation import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, source, seqlen=args.eval_seqlen, batch_size=args.eval_batch_size,
                               max_windows=args.eval_windows).ppl


def _check_output(args) -> None:
    """``--output`` may be written: refuses what would destroy files (``check_output_dir``), naming the flag."""
    from .checkpoint.saving import check_output_dir

    check_output_dir(args.output, args.overwrite, inputs=[args.model], overwrite_option="--overwrite")


def _check_model_spec(spec: str) -> None:
    from .checkpoint.loading import check_model_spec

    check_model_spec(spec)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_compress(args) -> dict:
    from .compressor import A3Compressor
    from .config import A3Config
    from .checkpoint.loading import load_model_and_tokenizer
    from .checkpoint.records import compression_record, update_compression_record
    from .pipeline.distributed import current_ranks

    config = A3Config(
        ratio=args.ratio, head_dim_qk=args.head_dim_qk, head_dim_vo=args.head_dim_vo,
        intermediate_size=args.intermediate_size, components=tuple(s.strip() for s in args.components.split(",")),
        dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
        seed=args.seed, method=args.method, allocation=args.allocation, mlp_refit=args.mlp_refit,
        sequential=args.sequential, hold_mlp_intermediate=args.hold_mlp_intermediate, device=args.device,
        teacher_refit=args.teacher_refit, cap_kv_dims=args.cap_kv_dims,
        sensitivity_tokens=args.sensitivity_tokens, allocation_windows=args.allocation_windows,
        refit_stride=args.refit_stride,
        **({} if args.max_dim_factor is None else
           {"max_dim_factor": None if args.max_dim_factor == "none" else args.max_dim_factor}),
    )
    _check_output(args)  # before any expensive work
    _check_model_spec(args.model)
    if args.push_to_hub:
        from .checkpoint.hub import check_hub_access

        user = check_hub_access(args.push_to_hub, token=args.token)  # a bad token fails now, not after compressing
        _log(f"Hub token accepted (user {user}); will push to {args.push_to_hub}")
    summary = {"model": args.model, "output": args.output}
    if _use_streaming(args, config):
        compressor = A3Compressor(config)
        start = time.perf_counter()
        compressor.compress_checkpoint(args.model, args.output, overwrite=args.overwrite,
                                       stats_cache=args.stats_cache, max_shard_size=args.max_shard_size,
                                       trust_remote_code=args.trust_remote_code)
        if not current_ranks(args.device).is_main:  # under torchrun, rank 0 writes and reports
            return summary
        summary.update(low_memory=True, compress_seconds=round(time.perf_counter() - start, 1),
                       stats_cache_hit=compressor.last_timings["stats_cache_hit"])
        with open(os.path.join(args.output, "config.json")) as f:
            summary.update(compression_record(json.load(f)).sizes or {})
        if args.push_to_hub:
            summary["hub"] = _push(args.output, args.push_to_hub, args, after_save=True)
        return summary
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if not current_ranks(args.device).is_main:  # under torchrun: share the calibration, leave the rest to rank 0
        A3Compressor(config).compress(model, tokenizer)
        return summary
    if args.eval_source:
        summary["ppl_before"] = _ppl(model, tokenizer, args.eval_source, args)
        print(f"perplexity before ({args.eval_source}): {summary['ppl_before']:.3f}", flush=True)
    compressor = A3Compressor(config)
    start = time.perf_counter()
    small = compressor.compress(model, tokenizer, stats_cache=args.stats_cache)
    summary["compress_seconds"] = round(time.perf_counter() - start, 1)
    summary["stats_cache_hit"] = compressor.last_timings["stats_cache_hit"]
    if args.eval_source:
        summary["ppl_after"] = _ppl(small, tokenizer, args.eval_source, args)
        print(f"perplexity after  ({args.eval_source}): {summary['ppl_after']:.3f}", flush=True)
        update_compression_record(small.config, evaluation={
            "source": args.eval_source, "seqlen": args.eval_seqlen, "max_windows": args.eval_windows,
            "ppl_dense": summary["ppl_before"], "ppl_compressed": summary["ppl_after"]})
    summary.update(compression_record(small.config).sizes)  # [base, compressed], counted by the compressor
    compressor.save(small, args.output, tokenizer=tokenizer, overwrite=args.overwrite,
                    max_shard_size=args.max_shard_size)
    if args.push_to_hub:
        summary["hub"] = _push(args.output, args.push_to_hub, args, after_save=True)
    return summary


def _use_streaming(args, config) -> bool:
    """--low-memory: explicit, or automatic for safetensors checkpoints when nothing needs the whole model
    (``config``: the run's :class:`~optimum_a3.A3Config`, its method's options resolved)."""
    from .config import A3ConfigError
    from .checkpoint.loading import DEFAULT_MODEL
    from .checkpoint.weights import has_safetensors

    local_safetensors = os.path.isdir(args.model) and has_safetensors(args.model)
    streamable = local_safetensors or not (args.model == DEFAULT_MODEL or os.path.exists(args.model))
    # method="default" probes the whole model where it is loaded; streamed, it uses uniform dims (with a warning).
    probes_whole_model = config.probes_whole_model and not config.probes_by_default
    if args.low_memory:
        if not streamable:
            raise A3ConfigError(f"--low-memory needs a safetensors checkpoint (a directory or a Hub id), not {args.model}")
        if args.eval_source:
            raise A3ConfigError("--low-memory never holds the whole model: evaluate afterwards with `optimum-a3 eval`")
        if probes_whole_model:
            raise A3ConfigError("--low-memory never holds the whole model, which the mixed allocation probes: add "
                                "--allocation uniform or --sensitivity-tokens 0 (analytical errors alone), "
                                "or drop --low-memory")
        return True
    if args.low_memory is None and not args.eval_source and not probes_whole_model:
        return local_safetensors  # Hub ids: loaded whole, unless --low-memory asks to stream the shards
    return False


ZERO_SHOT_EXAMPLES = """
  # lm-evaluation-harness accuracy of the checkpoint and of its base model (the paper's table rows)
  optimum-a3 eval outputs/smollm2-a3-20 --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande \\
      --base HuggingFaceTB/SmolLM2-135M --batch-size 8 --output-dir outputs/zero-shot

  # a task of your own (lm-eval YAML files in a folder), 100 documents per task
  optimum-a3 eval outputs/smollm2-a3-20 --tasks my_task --include-path my_tasks/ --limit 100
"""
_ZERO_SHOT_ONLY = ("base", "include_path", "num_fewshot", "limit", "batch_size", "device", "output_dir")


def _add_zero_shot_options(p: argparse.ArgumentParser) -> None:
    z = p.add_argument_group("lm-evaluation-harness tasks (instead of perplexity; needs optimum-a3[eval])")
    z.add_argument("--tasks", default=None, metavar="LIST",
                   help="comma-separated lm-eval tasks, groups or tags (e.g. arc_easy,hellaswag,piqa); the "
                        "perplexity options are then not used")
    z.add_argument("--base", default=None, metavar="MODEL",
                   help="also evaluate this (uncompressed) model, for the comparison row")
    z.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra lm-eval task YAML files")
    z.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, mostly 0)")
    z.add_argument("--limit", type=float, default=None,
                   help="at most N documents per task (below 1: that fraction); quick checks only")
    z.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                   help="requests per forward pass (default 1), or auto (lm-eval finds the largest that fits)")
    z.add_argument("--device", default=None, help="cuda, cuda:1, cpu... (default: cuda when available)")
    z.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="lm-eval's bootstrap iterations for non-mean stderrs (0: none; default 100000)")
    z.add_argument("--output-dir", default=None, metavar="DIR",
                   help="also write zero_shot.json and zero_shot.md (the Markdown table) there")


def _batch_size(text: str) -> int | str:
    """--batch-size: a positive integer, or lm-eval's ``auto`` / ``auto:N``."""
    if text == "auto" or text.startswith("auto:") and text[5:].isdigit():
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a positive integer or auto, not {text!r}")


def _run_zero_shot(args) -> dict:
    """``optimum-a3 eval MODEL --tasks ...``: lm-eval on MODEL (and --base); the table goes to stderr."""
    from .integrations.zero_shot import evaluate_zero_shot, to_markdown

    for spec in (args.model, args.base):
        if spec is not None:
            _check_model_spec(spec)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # below 1: a fraction
    result = evaluate_zero_shot(args.model, args.tasks, base=args.base, batch_size=args.batch_size or 1, limit=limit,
                                num_fewshot=args.num_fewshot, device=args.device, include_path=args.include_path,
                                trust_remote_code=args.trust_remote_code, bootstrap_iters=args.bootstrap_iters,
                                log=_log)
    table = to_markdown(result)
    _log(table)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "zero_shot.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.output_dir, "zero_shot.md"), "w") as f:
            f.write(table)
    return result


def run_eval(args) -> dict:
    from .checkpoint.loading import load_model_and_tokenizer
    from .config import A3ConfigError
    from .integrations.quantization import inference_mode_as_no_grad

    if args.tasks is not None:
        return _run_zero_shot(args)
    given = [name for name in _ZERO_SHOT_ONLY if getattr(args, name) is not None]
    if given:
        raise A3ConfigError(f"--{given[0].replace('_', '-')} is an lm-eval option: it needs --tasks")
    _check_model_spec(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    with inference_mode_as_no_grad(model):  # quanto's 4-bit layers fail under inference_mode
        return {"model": args.model, "source": args.source, "ppl": _ppl(model, tokenizer, args.source, args)}


def _push(directory: str, repo_id: str, args, after_save: bool = False) -> dict:
    from .checkpoint.hub import HubPushError, check_checkpoint_dir, push_folder_to_hub

    check_checkpoint_dir(directory)
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    megabytes = sum(os.path.getsize(f) for f in files) / 1e6
    _log(f"pushing {directory} ({len(files)} files, {megabytes:.1f} MB) to {repo_id} ...")
    try:
        info = push_folder_to_hub(directory, repo_id, token=args.token, private=args.private or None,
                                  commit_message=args.commit_message, license=args.license)
    except HubPushError as exc:
        if after_save:
            raise HubPushError(f"{exc} (the checkpoint is saved in {directory}: retry with "
                               f"`optimum-a3 push {directory} {repo_id}`)") from exc
        raise
    _log(f"pushed: {info.commit_url}")
    return {"repo_id": info.repo_url.repo_id if info.repo_url else repo_id, "commit_url": info.commit_url,
            "commit": info.oid}


def run_push(args) -> dict:
    return {"directory": args.directory, **_push(args.directory, args.repo_id, args)}


def run_quantize(args) -> dict:
    import torch

    from .checkpoint.loading import load_model_and_tokenizer
    from .integrations.quantization import inference_mode_as_no_grad, quantize_model, save_quantized
    from .checkpoint.records import quantization_record, update_quantization_record

    _check_output(args)  # before any expensive work
    _check_model_spec(args.model)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = quantize_model(model, backend=args.backend, bits=args.bits, group_size=args.group_size,
                           skip=tuple(args.skip), dtype=getattr(torch, args.dtype))
    summary = {"model": args.model, "output": args.output, **quantization_record(model.config).to_dict()}
    if args.eval_source:
        with inference_mode_as_no_grad(model):  # quanto's 4-bit layers fail under inference_mode
            summary["ppl"] = _ppl(model, tokenizer, args.eval_source, args)
        update_quantization_record(model.config, evaluation={  # for the model card
            "source": args.eval_source, "seqlen": args.eval_seqlen, "max_windows": args.eval_windows,
            "ppl": summary["ppl"]})
    save_quantized(model, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
    return summary


def run_recover(args) -> dict:
    import torch

    from .compressor import A3Compressor
    from .config import A3Config
    from .checkpoint.loading import load_model_and_tokenizer
    from .checkpoint.records import compression_record, update_compression_record
    from .integrations.recovery import check_recovery_settings, recover

    _check_output(args)  # before any expensive work
    check_recovery_settings(args.train, args.steps, rank=args.rank, learning_rate=args.lr, seqlen=args.seqlen,
                            batch_size=args.batch_size, temperature=args.temperature)
    _check_model_spec(args.model)
    if args.teacher is not None:
        _check_model_spec(args.teacher)
    # The installed A3 class, which save() expects.
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    teacher = None
    if args.teacher is not None:
        teacher, _ = load_model_and_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    summary = {"model": args.model, "output": args.output}
    if args.eval_source:
        summary["ppl_before"] = _ppl(model, tokenizer, args.eval_source, args)
    recovered = recover(model, tokenizer, dataset=args.dataset, steps=args.steps, method=args.train,
                        teacher=teacher, temperature=args.temperature, rank=args.rank, alpha=args.alpha,
                        learning_rate=args.lr, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
                        autocast_dtype=torch.bfloat16 if args.bf16_autocast else None)
    del teacher
    summary["recovery"] = compression_record(recovered.config).recovery
    if args.eval_source:
        summary["ppl_after"] = _ppl(recovered, tokenizer, args.eval_source, args)
        update_compression_record(recovered.config, evaluation={  # for the card; the dense figure was not measured
            "source": args.eval_source, "seqlen": args.eval_seqlen, "max_windows": args.eval_windows,
            "ppl_dense": None, "ppl_compressed": summary["ppl_after"], "ppl_before_recovery": summary["ppl_before"]})
    # save() writes the model as it is: the compressor's own settings play no part.
    A3Compressor(A3Config(ratio=0.0)).save(recovered, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
    return summary


def _one_line(exc: BaseException) -> str:
    from .errors import one_line

    text = one_line(exc)
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits 2 with usage on bad syntax

    from huggingface_hub.utils import HFValidationError

    from .errors import A3Error

    commands = {"compress": run_compress, "eval": run_eval, "push": run_push, "quantize": run_quantize,
                "recover": run_recover}
    try:
        result = commands[args.command](args)
    except (A3Error, HFValidationError, OSError) as exc:  # the library's own errors, bad ids, unreadable files
        print(f"optimum-a3 {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
