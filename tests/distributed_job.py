"""One rank of a test's ``torchrun`` job (tests/test_distributed.py): compress a tiny checkpoint.

    python distributed_job.py MODE METHOD SRC OUT [--fail-rank R] [--stats-cache DIR]

MODE ``streamed`` runs ``compress_checkpoint`` (rank 0 writes OUT); ``memory`` runs ``compress`` on the
loaded model and rank 0 saves it to OUT, rank r > 0 to OUT.rank<r>. ``--fail-rank R`` makes rank R raise
while solving layer 1. Each rank prints the layers it solved and how many sensitivity probes it ran.
Calibration: 8 random windows of 32 tokens (seed 1), shared between the ranks; the mixed allocation
(``quality``) probes a 16-token prefix of the first window.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import random_token_windows  # noqa: E402

import optimum_a3.pipeline.loop as loop  # noqa: E402
import optimum_a3.pipeline.sensitivity as sensitivity  # noqa: E402
from optimum_a3 import A3Compressor, A3Config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["streamed", "memory"])
    parser.add_argument("method")
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--stats-cache", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, solve, solved = int(os.environ.get("RANK", 0)), loop.solve_mlp, []

    def counted_solve(adapter, layer, *a, **k):  # records which layers this rank solves; may fail on layer 1
        solved.append(layer.self_attn.layer_idx)
        if rank == args.fail_rank and solved[-1] == 1:
            raise RuntimeError(f"planted failure on rank {args.fail_rank}")
        return solve(adapter, layer, *a, **k)

    loop.solve_mlp = counted_solve
    probe_kl, probes = sensitivity.SensitivityProbe.kl, []

    def counted_probe(self, *a, **k):  # how many sensitivity probes this rank runs
        probes.append(None)
        return probe_kl(self, *a, **k)

    sensitivity.SensitivityProbe.kl = counted_probe
    compressor = A3Compressor(A3Config(ratio=0.25, method=args.method, nsamples=8, seqlen=32, sensitivity_tokens=16,
                                       allocation_windows=2 if args.method == "default" else None))
    ids = random_token_windows(8, 32, seed=1)
    if args.mode == "streamed":
        compressor.compress_checkpoint(args.src, args.out, calibration_ids=ids, progress=False, overwrite=True,
                                       stats_cache=args.stats_cache)
    else:
        from transformers import AutoModelForCausalLM

        small = compressor.compress(AutoModelForCausalLM.from_pretrained(args.src), calibration_ids=ids,
                                    progress=False, stats_cache=args.stats_cache)
        # Every rank returns the whole model (layers solved elsewhere are received): each saves its own.
        compressor.save(small, f"{args.out}.rank{rank}" if rank else args.out, overwrite=True)
    print(f"rank {rank} solved layers {solved}", flush=True)
    print(f"rank {rank} ran {len(probes)} probes", flush=True)


if __name__ == "__main__":
    main()
