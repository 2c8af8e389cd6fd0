"""Data-parallel calibration on this machine: 1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo).

The calibration forward is what grows with the model (the paper: 20.9 h of a 70B run, nearly all of it),
and it splits over the calibration windows. This times it for SmolLM2-135M (the embedded GGUF, paper
method: statistics of the original model, so nothing but the forward and the solve) both ways, with
the same windows, against 1 process x 1 thread, and reports the forward's wall time, the scaling efficiency
(t(1 x 1) / (cores x t)) and each rank's peak resident memory. The paper method solves its layers in
parallel across the ranks (each rank solves the layers it owns), so the solve column is per rank.

    python examples/distributed_benchmark.py                      # 16 x 512 calibration tokens
    python examples/distributed_benchmark.py --nsamples 32 --seqlen 2048

Every measurement is a fresh process (peak RSS = VmHWM, which includes imports and the model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MB = 1024 * 1024


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def worker(args) -> None:
    """One rank: load SmolLM2, compress with the paper method, print a JSON line with the timings."""
    import torch

    torch.set_num_threads(args.threads)
    from optimum_a3 import A3Compressor, A3Config
    from optimum_a3.checkpoint.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-offline")
    compressor = A3Compressor(A3Config(ratio=0.2, method="paper", nsamples=args.nsamples, seqlen=args.seqlen))
    start = time.perf_counter()
    small = compressor.compress(model, tokenizer, progress=False)
    timings = compressor.last_timings
    if int(os.environ.get("RANK", 0)) == 0:  # for the comparison of the weights across setups
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in small.state_dict().items() if k != "lm_head.weight"}, args.save)
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                      "threads": args.threads, "forward_s": round(timings["calibration_forward_s"], 2),
                      "solve_s": round(timings["solve_s"], 2), "compress_s": round(time.perf_counter() - start, 2),
                      "peak_rss_mb": round(peak_rss_mb())}), flush=True)


def run(world: int, threads: int, args) -> list[dict]:
    save = os.path.join(args.tmp, f"weights-{world}x{threads}.safetensors")
    script = [os.path.abspath(__file__), "--worker", "--threads", str(threads), "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--save", save]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *script]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return sorted((json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        compare(args)


def weight_difference(a_path: str, b_path: str) -> tuple[bool, float]:
    """Whether the kept RoPE pairs are the same, and the largest weight difference."""
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    same_pairs = all(a[k].equal(b[k]) for k in a if "rope_pairs" in k)
    return same_pairs, max((a[k].double() - b[k].double()).abs().max().item() for k in a if "rope_pairs" not in k)


def compare(args) -> None:
    print(f"SmolLM2-135M, method=paper, {args.nsamples} x {args.seqlen} calibration tokens, {os.cpu_count()} cores")
    base, threads, ranks = run(1, 1, args), run(1, 2, args), run(2, 1, args)
    t0, c0 = base[0]["forward_s"], base[0]["compress_s"]
    print(f"{'setup':<26} {'forward s':>10} {'efficiency':>11} {'compress s':>11} {'efficiency':>11} "
          f"{'solve s per rank':>17} {'peak RSS MB per rank':>22}")
    for name, rows, cores in (("1 process x 1 thread", base, 1), ("1 process x 2 threads", threads, 2),
                              ("2 processes x 1 thread", ranks, 2)):
        t, c = max(r["forward_s"] for r in rows), max(r["compress_s"] for r in rows)
        print(f"{name:<26} {t:>10.2f} {t0 / (cores * t):>11.0%} {c:>11.2f} {c0 / (cores * c):>11.0%} "
              f"{' / '.join(str(r['solve_s']) for r in rows):>17} "
              f"{' / '.join(str(r['peak_rss_mb']) for r in rows):>22}")
    print("forward s: compression less this rank's own solves (under layer-parallel solving it includes the wait "
          "for the layers other ranks solve); compress s: the whole compression")
    print("efficiency: t(1 x 1) / (cores x t); 100% = linear scaling")
    same_pairs, diff = weight_difference(os.path.join(args.tmp, "weights-1x1.safetensors"),
                                         os.path.join(args.tmp, "weights-2x1.safetensors"))
    print(f"2 processes vs 1: same kept RoPE pairs: {same_pairs}; largest weight difference {diff:.3g}")
    print(json.dumps({"1x1": base, "1x2": threads, "2x1": ranks}))


if __name__ == "__main__":
    main()
