"""A3 beside its baselines in one run: perplexity, size, KV cache, compression cost and speed.

    python examples/benchmark.py                       # SmolLM2-135M (offline), ratios 0.1 0.2 0.3
    python examples/benchmark.py --eval-windows 16     # quicker: first 16 WikiText-2 windows

Writes ``results.md``, ``results.json`` and ``ppl_vs_ratio.png`` to ``--out``. Every model sees the
same calibration windows, the same evaluation windows and the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time

import psutil
import torch
from safetensors.torch import save_model

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.baselines import collect_input_gram, compress_plain_svd, compress_svd_llm
from optimum_a3.budget import decoder_linear_params, kv_cache_bytes_per_token, total_params
from optimum_a3.calibration import calibration_windows
from optimum_a3.evaluation import perplexity, tokenize_rows, wikitext2_test_rows
from optimum_a3.loading import load_model_and_tokenizer


# A3 rows: the paper, each beyond-the-paper option alone, the library default (sequential calibration)
# and the default with the refit added (the lowest perplexity, at a higher compression cost).
A3_VARIANTS = {
    "a3": {"method": "paper"},
    "a3-refit": {"mlp_refit": True, "sequential": False},
    "a3-mixed": {"allocation": "mixed", "mlp_refit": False, "sequential": False},
    "a3-default": {"method": "default"},
    "a3-default-refit": {"method": "default", "mlp_refit": True},
}


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def checkpoint_bytes(model) -> int:
    """Size of the weights as one safetensors file (tied weights stored once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_model(model, path)
        return os.path.getsize(path)


@torch.inference_mode()
def prefill_tokens_per_s(model, vocab: int, batch: int, seqlen: int, repeats: int) -> float:
    ids = torch.randint(3, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    model(ids[:, :64], use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        best = min(best, time.perf_counter() - t0)
    return batch * seqlen / best


@torch.inference_mode()
def decode_tokens_per_s(model, vocab: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    ids = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    kwargs = dict(do_sample=False, use_cache=True, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                  pad_token_id=0)
    model.generate(ids, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-offline")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--methods", nargs="+", default=[*A3_VARIANTS, "svd", "svd-llm"],
                   help="A3 variants (" + ", ".join(A3_VARIANTS) + "), svd, svd-llm")
    p.add_argument("--calibration", default="wikipedia-offline")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-source", default=None, help="default: WikiText-2 test (local ../shared file first)")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="default: the full split")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-seqlen", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from --out/results.json")
    args = p.parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        write_report(argparse.Namespace(**saved["args"]), saved["rows"], saved["calib_forward_s"],
                     saved["machine"]["torch_threads"])
        return

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    model, tok = load_model_and_tokenizer(args.model)
    vocab = model.config.vocab_size
    calib = calibration_windows(tok, args.calibration, args.nsamples, args.seqlen, args.seed)
    eval_rows = wikitext2_test_rows(args.eval_source) if args.eval_source is None or args.eval_source.endswith(".raw") \
        else None
    from optimum_a3.data import load_rows

    eval_ids = tokenize_rows(eval_rows if eval_rows is not None else load_rows(args.eval_source), tok)

    # The reference cost: one plain forward pass over the calibration windows.
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in calib:
            model.model(row[None], use_cache=False)
    calib_forward_s = time.perf_counter() - t0
    print(f"calibration forward alone: {calib_forward_s:.1f} s ({args.nsamples} x {args.seqlen} tokens)", flush=True)

    rows = []

    def measure(method, ratio, small, compress_s=None, peak_mb=None, forward_share=None):
        print(f"[{method} {ratio}] evaluating", flush=True)
        result = perplexity(small, eval_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows, progress=False)
        row = {
            "method": method, "ratio": ratio, "ppl": result.ppl, "eval_windows": result.num_windows,
            "decoder_linear_params": decoder_linear_params(small), "total_params": total_params(small),
            "checkpoint_bytes": checkpoint_bytes(small), "kv_bytes_per_token": kv_cache_bytes_per_token(small),
            "compress_s": compress_s, "compress_over_calib_forward": None if compress_s is None else compress_s / calib_forward_s,
            "calib_forward_share": forward_share, "compress_peak_extra_mb": peak_mb,
            "prefill_tok_s": prefill_tokens_per_s(small, vocab, args.prefill_batch, args.prefill_seqlen, args.repeats),
            "decode_tok_s": decode_tokens_per_s(small, vocab, 32, args.decode_tokens, args.repeats),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"machine": machine(threads), "args": vars(args), "calib_forward_s": calib_forward_s,
                       "rows": rows}, f, indent=2)

    measure("dense", 0.0, model)
    grams, refit_stats = None, None
    for ratio in args.ratios:
        paper_stats = None
        for method in [m for m in args.methods if m in A3_VARIANTS]:
            overrides = A3_VARIANTS[method]
            compressor = A3Compressor(A3Config(ratio=ratio, seed=args.seed, **overrides))
            cfg = compressor.config
            # Statistics are reused where they can be (as with a stats cache): the mixed allocation
            # reuses the paper run's, the refit reuses the first ratio's. Sequential runs are always fresh.
            reuse = None
            if cfg.allocation == "mixed" and not cfg.mlp_refit and paper_stats is not None:
                reuse = paper_stats
            elif cfg.mlp_refit and not cfg.sequential and refit_stats is not None:
                reuse = refit_stats
            keep = method == "a3" or (cfg.mlp_refit and not cfg.sequential)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                small = compressor.compress(model, calibration_ids=calib, statistics=reuse, keep_statistics=keep,
                                            progress=False)
                took = time.perf_counter() - t0
            if method == "a3":
                paper_stats = compressor.last_statistics
            if keep and cfg.mlp_refit:
                refit_stats = compressor.last_statistics
            if reuse is None:
                measure(method, ratio, small, took, mem.extra_mb, compressor.last_timings["calibration_forward_s"] / took)
            else:
                measure(method, ratio, small)
            del small
        if "svd" in args.methods:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                small = compress_plain_svd(model, ratio, progress=False)
                took = time.perf_counter() - t0
            measure("svd", ratio, small, took, mem.extra_mb, 0.0)
            del small
        if "svd-llm" in args.methods:
            fresh = grams is None
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if fresh:
                    grams = collect_input_gram(model, calib, progress=False)
                    cal_s = time.perf_counter() - t0
                small = compress_svd_llm(model, ratio, grams=grams, progress=False)
                took = time.perf_counter() - t0
            # Only the first ratio pays for the calibration forward; later ones reuse the statistics.
            if fresh:
                measure("svd-llm", ratio, small, took, mem.extra_mb, cal_s / took)
            else:
                measure("svd-llm", ratio, small)
            del small

    write_report(args, rows, calib_forward_s, threads)


def machine(threads: int) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": threads,
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "python": platform.python_version()}


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def write_report(args, rows, calib_forward_s, threads):
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [
        f"Model `{args.model}`, calibration {args.nsamples} x {args.seqlen} tokens of `{args.calibration}` "
        f"(seed {args.seed}), WikiText-2 test perplexity at seqlen {args.eval_seqlen} on "
        f"{dense['eval_windows']} windows; {threads} threads; calibration forward alone {calib_forward_s:.1f} s.",
        "",
        "| method | ratio | WikiText-2 ppl | decoder linear params | total params | checkpoint MB | KV bytes/token "
        "| compress s | compress / calib fwd | calib fwd share | peak extra MB | prefill tok/s (x dense) | decode tok/s (x dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']:.1f} | {r['ppl']:.2f} | {r['decoder_linear_params']:,} | {r['total_params']:,} "
            f"| {r['checkpoint_bytes'] / 1e6:.1f} | {r['kv_bytes_per_token']:,} | {_fmt(r['compress_s'], '.1f')} "
            f"| {_fmt(r['compress_over_calib_forward'], '.2f')} | {_fmt(r['calib_forward_share'], '.0%')} "
            f"| {_fmt(r['compress_peak_extra_mb'], '.0f')} "
            f"| {r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / dense['prefill_tok_s']:.2f}x) "
            f"| {r['decode_tok_s']:.1f} ({r['decode_tok_s'] / dense['decode_tok_s']:.2f}x) |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["ratio"], r["ppl"]) for r in rows if r["method"] == method)
        ax.plot([0.0] + [x for x, _ in pts], [dense["ppl"]] + [y for _, y in pts], marker="o", label=method)
    ax.set_xlabel("compression ratio (decoder linear parameters removed)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{args.model}: perplexity vs ratio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ppl_vs_ratio.png"), dpi=120)


if __name__ == "__main__":
    main()
