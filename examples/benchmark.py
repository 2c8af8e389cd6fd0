"""A3 beside its baselines in one run: perplexity, size, KV cache, compression cost and speed.

    python examples/benchmark.py                       # SmolLM2-135M (offline), ratios 0.1 0.2 0.3
    python examples/benchmark.py --eval-windows 16     # quicker: first 16 WikiText-2 windows

Writes ``results.md``, ``results.json`` and ``ppl_vs_ratio.png`` to ``--out``. Every model sees the
same calibration windows, the same evaluation windows and the same thread count.

Three phases; keep the machine quiet during the first two, whose figures are timings:

1. build: every model is compressed once. Each compression that runs a calibration forward is timed
   against a plain forward over the same calibration windows measured just before it, so that a
   machine whose speed drifts during the run (seen here: +-20% over an hour) does not bias the ratio.
2. speed: prefill and decode are timed in ``--repeats`` interleaved rounds over all models (dense
   included), best round per model, so that drift and transient slowdowns hit every model alike.
3. evaluation: perplexity of every model (the long part: ~12 min per model for the full split on 2
   CPU cores), then on ``--heldout-source`` (default: held-out offline Wikipedia leads, 52 windows, ~4 min
   per model); these figures do not depend on what else runs.
4. with ``--tasks``: lm-evaluation-harness accuracy of every model on those tasks (the 'eval' extra),
   one table column per task metric (acc and acc_norm where the task has them).

With ``--recover-steps N``, each A3 model is also fine-tuned (its weights distilled from the dense model,
``recover(method="weights", teacher=dense)``) in phase 1, as an extra ``<method>+kd`` row.

``results.json`` is rewritten after every step, so a cut-off run keeps what it measured (rows without
``ppl`` are not evaluated yet; ``--report-only`` tabulates what is there). Every model stays in memory
until the end (SmolLM2-135M in float32: ~0.5 GB each, 16-21 models): choose ``--methods`` and
``--ratios`` accordingly for larger models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch
from safetensors.torch import save_model

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.integrations.baselines import collect_input_gram, compress_plain_svd, compress_svd_llm
from optimum_a3.math.budget import decoder_linear_params, kv_cache_bytes_per_token, total_params
from optimum_a3.calibration.windows import calibration_windows
from optimum_a3.calibration.text import load_rows
from optimum_a3.integrations.evaluation import perplexity, tokenize_rows, wikitext2_test_rows
from optimum_a3.integrations.recovery import recover
from optimum_a3.checkpoint.loading import load_model_and_tokenizer


# A3 rows: the paper, each beyond-the-paper option alone (a3-refit: the down_proj refit; a3-mixed: the paper's
# statistics, dims from the measured-sensitivity allocation on 1024 probe tokens), sequential calibration with
# uniform dims (the default before the mixed allocation joined it), with the refit added, or holding no MLP
# intermediate (the same model, for less memory and more time), the library default (sequential calibration
# and the cheaply priced mixed allocation), the quality preset, and the quality preset with its first pass (which
# only prices the dims) on one window instead of every window, the default's cheaper pricing.
A3_VARIANTS = {
    "a3": {"method": "paper"},
    "a3-refit": {"allocation": "uniform", "mlp_refit": True, "sequential": False},
    "a3-mixed": {"allocation": "mixed", "mlp_refit": False, "sequential": False, "sensitivity_tokens": 1024},
    "a3-sequential": {"method": "default", "allocation": "uniform", "mlp_refit": False},
    "a3-sequential-refit": {"method": "default", "allocation": "uniform", "mlp_refit": True},
    "a3-sequential-lean": {"method": "default", "allocation": "uniform", "mlp_refit": False,
                           "hold_mlp_intermediate": False},
    "a3-default-norefit": {"method": "default", "mlp_refit": False},
    "a3-default": {"method": "default"},
    "a3-quality": {"method": "quality"},
    "a3-quality-onewindow": {"method": "quality", "allocation_windows": 1},
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


@dataclass
class Built:
    """One model of the run and what has been measured of it so far (``row`` goes to results.json)."""

    model: torch.nn.Module
    row: dict = field(default_factory=dict)


def checkpoint_bytes(model) -> int:
    """Size of the weights as one safetensors file (tied weights stored once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        save_model(model, path)
        return os.path.getsize(path)


@torch.inference_mode()
def calibration_forward_s(model, calib: torch.Tensor) -> float:
    """The reference cost: one plain forward of the decoder over the calibration windows."""
    t0 = time.perf_counter()
    for row in calib:
        model.model(row[None], use_cache=False)
    return time.perf_counter() - t0


@torch.inference_mode()
def prefill_s(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    kwargs = dict(do_sample=False, use_cache=True, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                  pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(prompt, **kwargs)
    return time.perf_counter() - t0


def build_models(args, model, tokenizer, calib, save) -> list[Built]:
    """Phase 1: the dense model and every compressed one, with their compression cost."""
    cost_fields = ("compress_s", "calib_forward_s", "compress_over_calib_forward", "calib_forward_share",
                   "compress_peak_extra_mb")
    built = [Built(model, {"method": "dense", "ratio": 0.0, **dict.fromkeys(cost_fields)})]
    reference_s = None

    def add(method, ratio, small, compress_s=None, peak_mb=None, forward_share=None):
        row = {"method": method, "ratio": ratio, **dict.fromkeys(cost_fields), "compress_s": compress_s,
               "calib_forward_share": forward_share, "compress_peak_extra_mb": peak_mb}
        if compress_s is not None:
            row["calib_forward_s"] = reference_s
            row["compress_over_calib_forward"] = compress_s / reference_s
        built.append(Built(small, row))
        print(f"[{method} {ratio}] built" + ("" if compress_s is None else f" in {compress_s:.1f} s "
              f"({row['compress_over_calib_forward']:.2f}x the calibration forward)"), flush=True)
        save(built)

    def add_recovered(method, ratio, small):
        # The A3 weights distilled from the dense model (recover(method="weights", teacher=...)): the row
        # "<method>+kd" has the same dims, so only its perplexity and the fine-tune's time differ.
        print(f"[{method} {ratio}] recovery fine-tune, {args.recover_steps} steps", flush=True)
        t0 = time.perf_counter()
        recovered = recover(small, tokenizer, args.recover_dataset, args.recover_steps, method="weights",
                            teacher=model, seqlen=args.recover_seqlen, batch_size=args.recover_batch_size,
                            seed=args.seed, autocast_dtype=torch.bfloat16, progress=False)
        took = time.perf_counter() - t0
        record = recovered.config.a3_compression["recovery"]
        built.append(Built(recovered, {"method": f"{method}+kd", "ratio": ratio, **dict.fromkeys(cost_fields),
                                       "recover_s": took, "recovery": record}))
        print(f"[{method}+kd {ratio}] built in {took:.1f} s", flush=True)
        save(built)

    def reference():
        nonlocal reference_s
        reference_s = calibration_forward_s(model, calib)
        print(f"calibration forward alone: {reference_s:.1f} s ({len(calib)} x {calib.shape[1]} tokens)", flush=True)

    # Warm-up: the first forward of a process pays for allocator growth and kernel selection, which would
    # otherwise make the first reference forward (and so the first compression ratio) look different.
    warm_s = calibration_forward_s(model, calib[:1])
    print(f"warm-up forward: {warm_s:.1f} s (1 x {calib.shape[1]} tokens)", flush=True)
    grams, refit_stats = None, None
    for ratio in args.ratios:
        paper_stats = None
        for method in [m for m in args.methods if m in A3_VARIANTS]:
            compressor = A3Compressor(A3Config(ratio=ratio, seed=args.seed, **A3_VARIANTS[method]))
            cfg = compressor.config
            # Statistics are reused where they can be (as with a stats cache): the paper-statistics mixed
            # allocation reuses the paper run's, the refit reuses the first ratio's. Sequential runs (mixed
            # ones included: their first pass is timed too) are always fresh.
            reuse = None
            if cfg.allocation == "mixed" and not cfg.mlp_refit and not cfg.sequential and paper_stats is not None:
                reuse = paper_stats
            elif cfg.mlp_refit and not cfg.sequential and refit_stats is not None:
                reuse = refit_stats
            keep = method == "a3" or (cfg.mlp_refit and not cfg.sequential)
            if reuse is None:
                reference()
            print(f"[{method} {ratio}] compressing", flush=True)
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
                add(method, ratio, small, took, mem.extra_mb, compressor.last_timings["calibration_forward_s"] / took)
            else:
                add(method, ratio, small)
            if args.recover_steps:
                add_recovered(method, ratio, small)
        if "svd" in args.methods:  # no calibration data: compared with the latest reference forward
            if reference_s is None:
                reference()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                small = compress_plain_svd(model, ratio, progress=False)
                took = time.perf_counter() - t0
            add("svd", ratio, small, took, mem.extra_mb, 0.0)
        if "svd-llm" in args.methods:
            # Only the first ratio pays for the calibration forward; later ones reuse the statistics.
            fresh = grams is None
            if fresh:
                reference()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                if fresh:
                    grams = collect_input_gram(model, calib, progress=False)
                    cal_s = time.perf_counter() - t0
                small = compress_svd_llm(model, ratio, grams=grams, progress=False)
                took = time.perf_counter() - t0
            if fresh:
                add("svd-llm", ratio, small, took, mem.extra_mb, cal_s / took)
            else:
                add("svd-llm", ratio, small)
    return built


def measure_speed(args, built: list[Built], vocab: int, save) -> None:
    """Phase 2: prefill and decode of every model in interleaved rounds; the best round counts."""
    gen = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(3, vocab, (args.prefill_batch, args.prefill_seqlen), generator=gen)
    prompt = torch.randint(3, vocab, (1, 32), generator=gen)
    for entry in built:  # warm-up: first calls allocate and pick kernels
        prefill_s(entry.model, prefill_ids[:, :64])
        decode_s(entry.model, prompt, 2)
    best = [[float("inf"), float("inf")] for _ in built]
    for rnd in range(args.repeats):
        for i, entry in enumerate(built):
            best[i][0] = min(best[i][0], prefill_s(entry.model, prefill_ids))
            best[i][1] = min(best[i][1], decode_s(entry.model, prompt, args.decode_tokens))
        print(f"speed round {rnd + 1}/{args.repeats} done", flush=True)
    for entry, (prefill, decode) in zip(built, best):
        entry.row["prefill_tok_s"] = prefill_ids.numel() / prefill
        entry.row["decode_tok_s"] = args.decode_tokens / decode
    save(built)


def evaluate(args, built: list[Built], eval_ids: torch.Tensor, heldout_ids: torch.Tensor | None, save) -> None:
    """Phase 3: sizes and perplexity (WikiText-2, then the held-out text: a second domain, so that a variant
    that only fits the evaluation set's style shows up)."""
    for entry in built:
        small, row = entry.model, entry.row
        row.update(decoder_linear_params=decoder_linear_params(small), total_params=total_params(small),
                   checkpoint_bytes=checkpoint_bytes(small), kv_bytes_per_token=kv_cache_bytes_per_token(small))
        print(f"[{row['method']} {row['ratio']}] evaluating", flush=True)
        result = perplexity(small, eval_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows, progress=False)
        row.update(ppl=result.ppl, eval_windows=result.num_windows)
        print(f"[{row['method']} {row['ratio']}] ppl {result.ppl:.2f} on {result.num_windows} windows", flush=True)
        if heldout_ids is not None:
            result = perplexity(small, heldout_ids, seqlen=args.eval_seqlen, max_windows=args.heldout_windows,
                                progress=False)
            row.update(heldout_ppl=result.ppl, heldout_windows=result.num_windows)
            print(f"[{row['method']} {row['ratio']}] held-out ppl {result.ppl:.2f} on {result.num_windows} windows",
                  flush=True)
        save(built)


def zero_shot(args, built: list[Built], tok, selection, save) -> None:
    """Phase 4 (--tasks): lm-eval accuracy of every model, through optimum_a3.integrations.zero_shot."""
    from optimum_a3.integrations.zero_shot import score_model

    for entry in built:
        row = entry.row
        print(f"[{row['method']} {row['ratio']}] lm-eval on {', '.join(selection.names)}", flush=True)
        device = str(next(entry.model.parameters()).device)  # where the other phases ran
        scored = score_model(entry.model, tok, selection, batch_size=args.tasks_batch_size, limit=args.tasks_limit,
                             device=device, name=f"{row['method']} {row['ratio']}")
        row["lm_eval"] = scored["tasks"]
        save(built)


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
    p.add_argument("--heldout-source", default="wikipedia-offline:heldout",
                   help="a second perplexity column on other text (default: the offline Wikipedia leads the "
                   "calibration does not draw from); 'none' to skip")
    p.add_argument("--heldout-windows", type=int, default=None, help="default: all of --heldout-source")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--prefill-seqlen", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved speed rounds (best round per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from --out/results.json")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="also each A3 model after this many steps of recovery: its weights distilled from the dense "
                   "model (a '<method>+kd' row; 0: none)")
    p.add_argument("--recover-dataset", default="wikipedia-offline:train", help="recovery training text")
    p.add_argument("--recover-seqlen", type=int, default=256, help="recovery: tokens per training window")
    p.add_argument("--recover-batch-size", type=int, default=1, help="recovery: training windows per step")
    p.add_argument("--tasks", default=None, help="also lm-eval accuracy on these comma-separated tasks (e.g. "
                   "arc_easy,hellaswag; needs optimum-a3[eval]); one column per task metric")
    p.add_argument("--tasks-limit", type=float, default=None, help="lm-eval: at most N documents per task")
    p.add_argument("--tasks-batch-size", type=int, default=1, help="lm-eval: requests per forward pass")
    p.add_argument("--include-path", default=None, help="lm-eval: folder of extra task YAML files")
    args = p.parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        if "calib_forward_s" in saved:  # one reference forward for the whole run, speed not interleaved
            raise SystemExit(f"{args.out}/results.json was written by an older version of this script")
        # The run's settings, but the report goes where --out says now.
        write_report(argparse.Namespace(**{**saved["args"], "out": args.out}), saved["rows"],
                     saved["machine"]["torch_threads"])
        return

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    selection = None
    if args.tasks:  # unknown task names or unreachable task data fail now, not after hours of compressing
        from optimum_a3.integrations.zero_shot import select_tasks

        selection = select_tasks(args.tasks, args.include_path)
        if args.tasks_limit is not None and args.tasks_limit >= 1:
            args.tasks_limit = int(args.tasks_limit)
    model, tok = load_model_and_tokenizer(args.model)
    calib = calibration_windows(tok, args.calibration, args.nsamples, args.seqlen, args.seed)
    if args.eval_source is None or args.eval_source.endswith(".raw"):
        eval_rows = wikitext2_test_rows(args.eval_source)
    else:
        eval_rows = load_rows(args.eval_source)
    eval_ids = tokenize_rows(eval_rows, tok)
    heldout_ids = None if args.heldout_source == "none" else tokenize_rows(load_rows(args.heldout_source), tok)

    def save(built):  # atomically: a run killed while writing keeps the previous results.json
        path = os.path.join(args.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"machine": machine(threads), "args": vars(args), "rows": [b.row for b in built]}, f, indent=2)
        os.replace(path + ".tmp", path)

    built = build_models(args, model, tok, calib, save)
    measure_speed(args, built, model.config.vocab_size, save)
    evaluate(args, built, eval_ids, heldout_ids, save)
    if selection is not None:
        zero_shot(args, built, tok, selection, save)
    write_report(args, [b.row for b in built], threads)


def machine(threads: int) -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": threads,
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "python": platform.python_version()}


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _speed(row, dense, key, spec):
    """``value (x dense)``, or what of it is known (a cut-off run may lack either)."""
    value, base = row.get(key), (dense or {}).get(key)
    if value is None:
        return ""
    return f"{value:{spec}}" + (f" ({value / base:.2f}x)" if base else "")


def _task_columns(args, rows):
    """lm-eval columns (``--tasks``): ``(header, [cell per row])``; none without --tasks."""
    if not getattr(args, "tasks", None):  # older results.json: no such option
        return [], [[] for _ in rows]
    from optimum_a3.integrations.zero_shot import format_metric, metric_columns

    columns = metric_columns([r.get("lm_eval") or {} for r in rows])
    header = [f"{task} {metric}" for task, metric in columns]
    cells = [[format_metric((r.get("lm_eval") or {}).get(task, {}).get(metric)) for task, metric in columns]
             for r in rows]
    return header, cells


def write_report(args, rows, threads):
    """results.md (and the plot, once the dense model is evaluated) from the rows measured so far."""
    dense = next((r for r in rows if r["method"] == "dense"), None)
    task_header, task_cells = _task_columns(args, rows)
    forwards = [r["calib_forward_s"] for r in rows if r.get("calib_forward_s")]
    forward_text = f"{min(forwards):.1f}-{max(forwards):.1f} s" if forwards else "not measured"
    windows = (dense or {}).get("eval_windows")
    heldout = getattr(args, "heldout_source", "none") != "none"  # older results.json: no such option
    heldout_windows = (dense or {}).get("heldout_windows")
    lines = [
        f"Model `{args.model}`, calibration {args.nsamples} x {args.seqlen} tokens of `{args.calibration}` "
        f"(seed {args.seed}), WikiText-2 test perplexity at seqlen {args.eval_seqlen} on "
        f"{windows or 'no'} windows"
        + (f", held-out perplexity on `{args.heldout_source}` ({heldout_windows or 'no'} windows)" if heldout else "")
        + f"; {threads} threads; calibration forward alone {forward_text} (measured before "
        f"each compression that runs one; plain SVD, which runs none, is compared with the latest); speed: best of "
        f"{args.repeats} interleaved rounds.",
        "",
        "| method | ratio | WikiText-2 ppl |" + (" held-out ppl |" if heldout else "")
        + " decoder linear params | total params | checkpoint MB | KV bytes/token "
        "| compress s | calib fwd alone s | compress / calib fwd | calib fwd share | peak extra MB "
        "| prefill tok/s (x dense) | decode tok/s (x dense) |" + "".join(f" {h} |" for h in task_header),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(task_header) + heldout),
    ]
    recovered = [r for r in rows if r.get("recover_s") is not None]
    if recovered:
        lines[0] += (f" `+kd` rows: the A3 weights distilled from the dense model for {args.recover_steps} steps of "
                     f"{args.recover_batch_size} x {args.recover_seqlen} tokens of `{args.recover_dataset}` "
                     "(bf16 autocast), in "
                     + ", ".join(f"{r['recover_s']:.0f} s ({r['method']} {r['ratio']:.1f})" for r in recovered) + ".")
    if task_header:
        limit = args.tasks_limit
        lines[0] += (f" lm-eval tasks {args.tasks} (each task's default few-shot count"
                     + ("" if limit is None else f", at most {limit} documents per task") + ").")
    for r, cells in zip(rows, task_cells):
        size = r.get("checkpoint_bytes")
        lines.append(
            f"| {r['method']} | {r['ratio']:.1f} | {_fmt(r.get('ppl'), '.2f')} |"
            + (f" {_fmt(r.get('heldout_ppl'), '.2f')} |" if heldout else "")
            + f" {_fmt(r.get('decoder_linear_params'), ',')} "
            f"| {_fmt(r.get('total_params'), ',')} | {_fmt(None if size is None else size / 1e6, '.1f')} "
            f"| {_fmt(r.get('kv_bytes_per_token'), ',')} "
            f"| {_fmt(r.get('compress_s'), '.1f')} | {_fmt(r.get('calib_forward_s'), '.1f')} "
            f"| {_fmt(r.get('compress_over_calib_forward'), '.2f')} | {_fmt(r.get('calib_forward_share'), '.0%')} "
            f"| {_fmt(r.get('compress_peak_extra_mb'), '.0f')} "
            f"| {_speed(r, dense, 'prefill_tok_s', '.0f')} | {_speed(r, dense, 'decode_tok_s', '.1f')} |"
            + "".join(f" {c} |" for c in cells)
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    if dense is None or dense.get("ppl") is None:
        return  # the dense model is not evaluated yet: no plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["ratio"], r["ppl"]) for r in rows if r["method"] == method and r.get("ppl") is not None)
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
