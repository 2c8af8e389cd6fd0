"""Command line: ``optimum-a3 compress | eval``."""

from __future__ import annotations

import argparse
import json
import sys
import time

EXAMPLES = """examples:
  optimum-a3 compress smollm2-offline --ratio 0.2 --output outputs/smollm2-a3-20 --eval wikitext2
  optimum-a3 compress meta-llama/Llama-3.1-8B --ratio 0.2 --output llama31-a3-20 --dataset hub:DKYoon/SlimPajama-6B::train
  optimum-a3 eval outputs/smollm2-a3-20 --source wikitext2 --max-windows 8
"""


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (default 2048, the paper's)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-a3",
        description="Compress causal LMs with A3 (analytical low-rank, arXiv 2505.12942) into smaller dense models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it (reloadable with trust_remote_code=True)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", help="hub id, local directory, .gguf file, or 'smollm2-offline' (the embedded default)")
    c.add_argument("--output", "-o", required=True, help="directory to write (must be empty unless --overwrite)")
    c.add_argument("--ratio", type=float, help="fraction of decoder-layer parameters to remove, in [0, 1)")
    c.add_argument("--head-dim-qk", type=int, help="explicit q/k head dim (even with RoPE)")
    c.add_argument("--head-dim-vo", type=int, help="explicit v/o head dim")
    c.add_argument("--intermediate-size", type=int, help="explicit MLP width")
    c.add_argument("--components", default="qk,ov,mlp", help="comma-separated subset of qk,ov,mlp (default all)")
    c.add_argument("--dataset", default="wikipedia-offline",
                   help="calibration text: wikipedia-offline (default), a .txt/.jsonl/.json/.parquet file, "
                        "or hub:NAME[:CONFIG[:SPLIT]]")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128, the paper's)")
    c.add_argument("--seqlen", type=int, default=2048, help="calibration window length in tokens (default 2048)")
    c.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward pass")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling")
    c.add_argument("--mlp-refit", action="store_true", help="least-squares refit of down_proj (beyond the paper)")
    c.add_argument("--device", default=None, help="device for calibration and solvers (default: the model's)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--eval", dest="eval_source", default=None, metavar="SOURCE",
                   help="also report perplexity before and after on SOURCE (e.g. wikitext2, wikipedia-offline:heldout)")
    _add_eval_options(c)

    e = sub.add_parser("eval", help="perplexity of a model (the GPTQ / SVD-LLM / A3 protocol)")
    e.add_argument("model", help="compressed checkpoint directory, hub id, .gguf file or 'smollm2-offline'")
    e.add_argument("--source", default="wikitext2",
                   help="wikitext2 (local ../shared file first, then datasets), wikitext2:PATH, a text file, "
                        "or wikipedia-offline:heldout")
    _add_eval_options(e)
    return parser


def _ppl(model, tokenizer, source, args) -> float:
    from .evaluation import evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, source, seqlen=args.eval_seqlen, batch_size=args.eval_batch_size,
                               max_windows=args.eval_windows).ppl


def run_compress(args) -> dict:
    from .budget import decoder_linear_params, kv_cache_bytes_per_token, total_params
    from .compressor import A3Compressor
    from .config import A3Config
    from .loading import load_model_and_tokenizer
    from .saving import check_output_dir

    config = A3Config(
        ratio=args.ratio, head_dim_qk=args.head_dim_qk, head_dim_vo=args.head_dim_vo,
        intermediate_size=args.intermediate_size, components=tuple(s.strip() for s in args.components.split(",")),
        dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
        seed=args.seed, mlp_refit=args.mlp_refit, device=args.device,
    )
    check_output_dir(args.output, args.overwrite)  # before any expensive work
    model, tokenizer = load_model_and_tokenizer(args.model)
    summary = {"model": args.model, "output": args.output}
    if args.eval_source:
        summary["ppl_before"] = _ppl(model, tokenizer, args.eval_source, args)
        print(f"perplexity before ({args.eval_source}): {summary['ppl_before']:.3f}", flush=True)
    compressor = A3Compressor(config)
    start = time.perf_counter()
    small = compressor.compress(model, tokenizer)
    summary["compress_seconds"] = round(time.perf_counter() - start, 1)
    if args.eval_source:
        summary["ppl_after"] = _ppl(small, tokenizer, args.eval_source, args)
        print(f"perplexity after  ({args.eval_source}): {summary['ppl_after']:.3f}", flush=True)
        small.config.a3_compression["evaluation"] = {
            "source": args.eval_source, "seqlen": args.eval_seqlen, "max_windows": args.eval_windows,
            "ppl_dense": summary["ppl_before"], "ppl_compressed": summary["ppl_after"]}
    summary.update(
        decoder_linear_params=[decoder_linear_params(model), decoder_linear_params(small)],
        total_params=[total_params(model), total_params(small)],
        kv_cache_bytes_per_token=[kv_cache_bytes_per_token(model), kv_cache_bytes_per_token(small)],
    )
    compressor.save(small, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
    return summary


def run_eval(args) -> dict:
    from .loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=True)
    return {"model": args.model, "source": args.source, "ppl": _ppl(model, tokenizer, args.source, args)}


def main(argv: list[str] | None = None) -> int:
    from .adapters import UnsupportedModelError
    from .calibration import CalibrationDataError
    from .config import A3ConfigError
    from .data import DataSourceError
    from .loading import ModelLoadError
    from .saving import OutputDirError

    args = build_parser().parse_args(argv)
    try:
        result = run_compress(args) if args.command == "compress" else run_eval(args)
    except (A3ConfigError, UnsupportedModelError, CalibrationDataError, DataSourceError, ModelLoadError,
            OutputDirError, OSError) as exc:
        print(f"optimum-a3 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
