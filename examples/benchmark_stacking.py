"""A3 stacked with 4-bit weight quantization and a LoRA recovery fine-tune: perplexity and bytes on disk.

    python examples/benchmark_stacking.py                    # SmolLM2-135M (offline), A3 20%, hqq + quanto
    python examples/benchmark_stacking.py --backends hqq --lora-steps 0      # quicker: no quanto, no LoRA

Rows: the dense model, A3 (method "default"), A3 + LoRA, each in float and quantized to 4 bits with every
``--backends`` library. Every quantized row is saved, reloaded with ``load_quantized`` (its logits must equal
the in-memory model's) and evaluated from the reloaded checkpoint. "bytes" counts the weight files of the
saved checkpoint; "x vs fp16" is the fp16 dense checkpoint's bytes over the row's. Writes
``stacking.md`` and ``stacking.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import platform
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.integrations.evaluation import perplexity, tokenize_rows, wikitext2_test_rows
from optimum_a3.checkpoint.loading import load_model_and_tokenizer
from optimum_a3.integrations.quantization import inference_mode_as_no_grad, load_quantized, quantize_model, save_quantized
from optimum_a3.integrations.recovery import recover_with_lora

WEIGHT_FILES = ("*.safetensors", "*.pt", "*.bin")
SECTIONS = ("dense", "a3", "lora")


def weight_bytes(directory: str) -> int:
    """Bytes of a checkpoint's weight files (config, code and tokenizer excluded)."""
    return sum(os.path.getsize(f) for pattern in WEIGHT_FILES for f in glob.glob(os.path.join(directory, pattern)))


def float_checkpoint_bytes(model, dtype: torch.dtype) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        copy.deepcopy(model).to(dtype).save_pretrained(tmp)
        return weight_bytes(tmp)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-offline")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calibration", default="wikipedia-offline")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--backends", nargs="+", default=["hqq", "quanto"], choices=["hqq", "quanto"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="hqq only (quanto chooses its own)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype the quantized models are built, saved and evaluated in (default bfloat16: as small "
                        "as fp16 on disk, and 3x faster than fp16 on this CPU); float rows are also given in it")
    p.add_argument("--lora-steps", type=int, default=300, help="0: no LoRA rows")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-seqlen", type=int, default=256)
    p.add_argument("--lora-autocast", choices=["bfloat16", "none"], default="bfloat16",
                   help="autocast dtype of the LoRA forward/backward (weights stay float32)")
    p.add_argument("--lora-lr", type=float, default=3e-4)
    p.add_argument("--lora-dataset", default="wikipedia-offline:train")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 evaluation of the float models")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", "--max-windows", dest="eval_windows", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="which models to measure (the A3 and LoRA models are cached in --out)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out/stacking.json and skip measuring them again")
    p.add_argument("--report-only", action="store_true", help="rewrite the table from --out/stacking.json")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "stacking.json")
    if args.report_only:
        write_report(args, load_rows(results_path))
        return
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    model, tok = load_model_and_tokenizer(args.model)  # float32
    eval_ids = tokenize_rows(wikitext2_test_rows(), tok)
    probe = eval_ids[:256].view(2, 128)
    rows: list[dict] = load_rows(results_path) if args.resume else []
    fp16_dense_bytes = float_checkpoint_bytes(model, torch.float16)

    def record(row: dict) -> None:
        row["x_vs_fp16_dense"] = fp16_dense_bytes / row["bytes"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        # Merged with the file's rows: several runs (--sections) may fill the same results.
        merged = {(r["model"], r["dtype"]): r for r in load_rows(results_path) + rows}
        with open(results_path, "w") as f:
            json.dump({"args": vars(args), "machine": machine(), "fp16_dense_bytes": fp16_dense_bytes,
                       "rows": list(merged.values())}, f, indent=2)

    def done(name: str, dtype_name: str) -> bool:
        return any(r["model"] == name and r["dtype"] == dtype_name for r in rows)

    def evaluate(name: str, small, dtype_name: str, nbytes: int, **extra) -> None:
        if done(name, dtype_name):
            return
        t0 = time.perf_counter()
        with inference_mode_as_no_grad(small):  # quanto's 4-bit layers fail under inference_mode on CPU
            result = perplexity(small, eval_ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                                progress=False)
        record({"model": name, "dtype": dtype_name, "ppl": result.ppl, "eval_windows": result.num_windows,
                "bytes": nbytes, "eval_s": round(time.perf_counter() - t0, 1), **extra})

    def float_rows(name: str, small) -> None:
        if not args.no_fp32 or dtype == torch.float32:
            evaluate(name, small, "float32", float_checkpoint_bytes(small, torch.float32))
        if dtype != torch.float32:
            low = copy.deepcopy(small).to(dtype)
            evaluate(name, low, args.dtype, float_checkpoint_bytes(low, dtype))
            del low

    def quantized_rows(name: str, small) -> None:
        for backend in args.backends:
            label = f"{name} + {backend} int{args.bits}" + (f" g{args.group_size}" if backend == "hqq" else "")
            if done(label, args.dtype):
                continue
            t0 = time.perf_counter()
            q = quantize_model(copy.deepcopy(small), backend=backend, bits=args.bits, dtype=dtype,
                               group_size=args.group_size if backend == "hqq" else None)
            quantize_s = time.perf_counter() - t0
            with torch.no_grad():
                expected = q(probe).logits
            with tempfile.TemporaryDirectory() as tmp:
                save_quantized(q, os.path.join(tmp, "ckpt"), tokenizer=tok)
                nbytes = weight_bytes(os.path.join(tmp, "ckpt"))
                reloaded = load_quantized(os.path.join(tmp, "ckpt"))
            with torch.no_grad():
                identical = bool(torch.equal(reloaded(probe).logits, expected))
            if not identical:
                raise SystemExit(f"{name} + {backend}: the reloaded checkpoint's logits differ from the in-memory one")
            record_q = q.config.a3_quantization
            evaluate(label, reloaded, args.dtype, nbytes, quantize_s=round(quantize_s, 1), reload_identical=identical,
                     group_sizes=record_q["group_sizes"])
            del q, reloaded

    # ---- dense
    if "dense" in args.sections:
        float_rows("dense", model)
        quantized_rows("dense", model)

    # ---- A3 (library default method) with a modest calibration
    compressor = A3Compressor(A3Config(ratio=args.ratio, method="default", dataset=args.calibration,
                                       nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed))
    # The compressed model is kept in --out so that a rerun (e.g. other backends) skips the calibration.
    cache = a3_cache_dir(args)
    if os.path.isfile(os.path.join(cache, "compress_seconds.json")):
        a3 = AutoModelForCausalLM.from_pretrained(cache).eval()  # the installed A3 class
        print(f"A3 {args.ratio}: reloaded from {cache}", flush=True)
    else:
        t0 = time.perf_counter()
        a3 = compressor.compress(model, tok, progress=False)
        compress_s = time.perf_counter() - t0
        compressor.save(a3, cache, tokenizer=tok, overwrite=True)
        with open(os.path.join(cache, "compress_seconds.json"), "w") as f:
            json.dump(compress_s, f)
        print(f"A3 {args.ratio}: compressed in {compress_s:.0f} s; record {a3.config.a3_compression}", flush=True)
    del model
    name = f"A3 {args.ratio}"
    if "a3" in args.sections:
        float_rows(name, a3)
        quantized_rows(name, a3)

    # ---- A3 + LoRA recovery
    if args.lora_steps > 0 and "lora" in args.sections:
        lora_cache = lora_cache_dir(args)
        if os.path.isfile(os.path.join(lora_cache, "lora_seconds.json")):
            recovered = AutoModelForCausalLM.from_pretrained(lora_cache).eval()
            print(f"LoRA: reloaded from {lora_cache}", flush=True)
        else:
            t0 = time.perf_counter()
            recovered = recover_with_lora(a3, tok, dataset=args.lora_dataset, steps=args.lora_steps,
                                          rank=args.lora_rank, learning_rate=args.lora_lr, seqlen=args.lora_seqlen,
                                          seed=args.seed,
                                          autocast_dtype=None if args.lora_autocast == "none" else torch.bfloat16)
            lora_s = time.perf_counter() - t0
            compressor.save(recovered, lora_cache, tokenizer=tok, overwrite=True)
            with open(os.path.join(lora_cache, "lora_seconds.json"), "w") as f:
                json.dump(lora_s, f)
            print(f"LoRA: {args.lora_steps} steps in {lora_s:.0f} s; {recovered.config.a3_compression['recovery']}",
                  flush=True)
        name = f"A3 {args.ratio} + LoRA r{args.lora_rank} x{args.lora_steps}"  # steps in the name: --resume
        float_rows(name, recovered)
        quantized_rows(name, recovered)

    write_report(args, load_rows(results_path))


def a3_cache_dir(args) -> str:
    return os.path.join(args.out, f"a3-{args.ratio}-{args.nsamples}x{args.seqlen}-seed{args.seed}")


def lora_cache_dir(args) -> str:
    return a3_cache_dir(args) + f"-lora-r{args.lora_rank}-{args.lora_steps}x{args.lora_seqlen}-lr{args.lora_lr}"


def load_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def _seconds(directory: str, name: str) -> float | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def write_report(args, rows: list[dict]) -> None:
    # dense rows, then A3, then A3 + LoRA, each in the order measured
    rows = sorted(rows, key=lambda r: 0 if r["model"].startswith("dense") else 2 if "LoRA" in r["model"] else 1)
    compress_s = _seconds(a3_cache_dir(args), "compress_seconds.json")
    lora_s = _seconds(lora_cache_dir(args), "lora_seconds.json")
    lora = (f"; LoRA rank {args.lora_rank}, {args.lora_steps} steps x {args.lora_seqlen} tokens of "
            f"`{args.lora_dataset}`, lr {args.lora_lr}, autocast {args.lora_autocast}"
            + (f" ({lora_s:.0f} s)" if lora_s else "") if args.lora_steps > 0 else "")
    fp16_dense_bytes = next(r["bytes"] * r["x_vs_fp16_dense"] for r in rows)
    header = (
        f"Model `{args.model}`; A3 ratio {args.ratio} (method default), calibration {args.nsamples} x {args.seqlen} "
        f"tokens of `{args.calibration}` (seed {args.seed}" + (f", {compress_s:.0f} s" if compress_s else "")
        + f"){lora}. WikiText-2 test perplexity at seqlen {args.eval_seqlen} on the first {rows[0]['eval_windows']} "
        f"windows. Bytes: weight files of the saved checkpoint; fp16 dense = {fp16_dense_bytes / 1e6:.1f} MB.")
    lines = [
        header,
        "",
        "| model | dtype | WikiText-2 ppl | MB on disk | x vs fp16 dense | group sizes (layers) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        groups = ", ".join(f"{k}: {v}" for k, v in r.get("group_sizes", {}).items())
        lines.append(f"| {r['model']} | {r['dtype']} | {r['ppl']:.2f} | {r['bytes'] / 1e6:.1f} "
                     f"| {r['x_vs_fp16_dense']:.2f} | {groups} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "stacking.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
