"""Peak memory of compressing SmolLM2-135M: whole model in memory vs streamed layer by layer, and the
time the statistics cache saves on a second ratio.

Every measurement runs in a fresh process (peak RSS = ``VmHWM`` of ``/proc/self/status``, which covers
the whole life of the process, imports included; ``getrusage`` would also count the forked parent's
pages), one after the other, same threads. The dense model is first exported
from the embedded GGUF as a float32 safetensors checkpoint, since streaming reads safetensors shards.

    python examples/memory_report.py                   # 32 x 2048 calibration tokens, as the benchmark
    python examples/memory_report.py --nsamples 8 --seqlen 512   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def child(args) -> None:
    """One measured run; prints a JSON line."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from optimum_a3 import A3Compressor, A3Config

    result = {"mode": args.mode}
    if args.mode != "import-only":
        config = A3Config(ratio=args.ratio, method=args.method, dataset="wikipedia-offline:train",
                          nsamples=args.nsamples, seqlen=args.seqlen)
        compressor = A3Compressor(config)
        if args.mode == "in-memory":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.dense)
            small = compressor.compress(model, tokenizer, progress=False, stats_cache=args.stats_cache)
            compressor.save(small, args.out, tokenizer=tokenizer)
        else:
            compressor.compress_checkpoint(args.dense, args.out, progress=False, stats_cache=args.stats_cache,
                                           max_shard_size=args.max_shard_size)
        result.update(ratio=args.ratio, method=args.method, stats_cache_hit=compressor.last_timings["stats_cache_hit"],
                      compress_s=round(compressor.last_timings["total_s"], 1))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = round(peak_rss_bytes() / MB, 1)
    print(json.dumps(result), flush=True)


def run(mode: str, args, out: Path | None = None, ratio: float | None = None, method: str = "paper",
        stats_cache: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dense", str(args.dense), "--threads", str(args.threads),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--method", method,
           "--max-shard-size", args.max_shard_size]
    if out is not None:
        cmd += ["--out", str(out), "--ratio", str(ratio)]
    if stats_cache:
        cmd += ["--stats-cache", stats_cache]
    print("running:", mode, ratio or "", method, "cache" if stats_cache else "", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_dense(directory: Path) -> None:
    from optimum_a3.checkpoint.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-offline")  # GGUF, dequantized to float32
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", dest="mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dense", type=Path, default=None, help="a dense safetensors checkpoint (default: export SmolLM2)")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="paper")
    parser.add_argument("--stats-cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-shard-size", default="100MB",
                        help="output shard size of the streamed runs: the output buffered in memory (default 100MB)")
    parser.add_argument("--with-default", action="store_true", help="also measure the default method (streamed: uniform dims)")
    parser.add_argument("--output", type=Path, default=Path("bench_results/memory.json"))
    args = parser.parse_args()
    if args.mode:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dense is None:
            args.dense = tmp / "dense"
            export_dense(args.dense)
        dense_bytes = sum(p.stat().st_size for p in args.dense.glob("*.safetensors"))
        cache = str(tmp / "stats-cache")
        rows = [
            run("import-only", args),
            run("in-memory", args, tmp / "a", 0.2),
            run("streamed", args, tmp / "b", 0.2, stats_cache=cache),
            run("streamed", args, tmp / "c", 0.3, stats_cache=cache),
        ]
        if args.with_default:
            rows += [run("in-memory", args, tmp / "d", 0.2, method="default"),
                     run("streamed", args, tmp / "e", 0.2, method="default")]
    report = {"dense_fp32_safetensors_mb": round(dense_bytes / MB, 1), "nsamples": args.nsamples,
              "max_shard_size": args.max_shard_size,
              "seqlen": args.seqlen, "threads": args.threads, "runs": rows}
    activations_mb = args.nsamples * args.seqlen * 576 * 4 / MB  # one copy of a layer's fp32 inputs (SmolLM2)
    print(f"\ndense fp32 checkpoint: {report['dense_fp32_safetensors_mb']} MB; calibration {args.nsamples} x "
          f"{args.seqlen} tokens (one copy of the hidden states: {activations_mb:.0f} MB)\n")
    print("| run | method | ratio | stats cache | compress s | process wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cache_text = "" if r["mode"] != "streamed" else ("hit" if r["stats_cache_hit"] else "miss (written)")
        print(f"| {r['mode']} | {r.get('method', '')} | {r.get('ratio', '')} | {cache_text} | "
              f"{r.get('compress_s', '')} | {r['wall_s']} | {r['peak_rss_mb']} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
