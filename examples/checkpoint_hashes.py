"""Golden checkpoint hashes: the sha256 of every file A3 writes, for tiny models in every mode.

What it is for: a refactor of the compression pipeline (e.g. "One pipeline that owns the layer loop")
must not change a single byte of what the library writes. This script compresses four tiny random
models (no downloads) in six modes and records the sha256 of every file of every output directory:

    models  llama-gqa-tied     Llama, 4 query heads / 2 KV heads, tied lm_head
            llama-mha-untied   Llama, 4 / 4 heads (MHA: per-head statistics), untied lm_head
            qwen2-gqa-untied   Qwen2 (random q/k/v biases), untied lm_head
            qwen3-gqa-tied     Qwen3 (random q/k RMSNorm weights), tied lm_head
    modes   paper              method="paper", in memory, saved with A3Compressor.save
            default            method="default" (probes priced on one window, then a sequential pass), in memory
            refit-every-token  method="default", refit_stride=1, on 16 calibration windows (the refit needs
                               4 tokens per MLP channel: the 8 windows of the other cases skip it), in memory
            uniform            method="default", allocation="uniform": sequential calibration alone, in memory
            streamed           method="default", A3Compressor.compress_checkpoint from a save_pretrained dir
                               (a streamed run cannot probe: the default's uniform dims, with a warning)
            streamed-cache-hit method="paper", compress_checkpoint run twice with the same stats_cache
                               directory; the second run (which reads the cached statistics) is hashed

Every case uses the same fixed seeds, calibration token ids (``random_token_windows(8, 32, seed=1)``;
16 windows where a mode sets ``nsamples``) and ratio 0.25. In-memory results are saved with
``tokenizer=tiny_tokenizer()``; streamed ones take the tokenizer saved next to the source checkpoint.

How to use it in a refactor::

    python examples/checkpoint_hashes.py --out before.json      # on the commit before the refactor
    ... refactor ...
    python examples/checkpoint_hashes.py --compare before.json  # exit 0: byte-identical; 1: differences

``--compare`` prints every difference (missing, extra and differing files per case) and a one-line
summary; ``--out`` and ``--compare`` combine. ``--cases SUBSTRING`` (repeatable) runs only the cases
whose "model/mode" name contains one of the substrings; only those are compared. ``--keep DIR`` keeps
the checkpoints (to diff a file that changed).

To hash another checkout's library (an older commit), clone it, copy this script into the clone and run
it with that clone on ``PYTHONPATH``::

    git clone /path/to/repo /tmp/old && git -C /tmp/old checkout <sha>
    cp examples/checkpoint_hashes.py /tmp/old/examples/
    PYTHONPATH=/tmp/old python /tmp/old/examples/checkpoint_hashes.py --out old.json

The tiny models come from ``tests/tiny_models.py`` of the checkout the script lies in (ROOT/tests);
the library is whatever ``import optimum_a3`` finds (PYTHONPATH first, else the installed package): the
script prints which, and warns when it is not the script's own checkout.

What the hashes depend on, besides the library: the versions of torch, transformers, safetensors and
tokenizers (printed at the start), the CPU's floating-point paths and the torch thread count (pinned to
``--threads``, default 1, since a BLAS reduction may split differently with more threads). Compare
hashes taken on the same machine and environment (environment variables too: up to commit 76264eb a
streamed tokenizer_config.json recorded ``local_files_only``, i.e. whether ``HF_HUB_OFFLINE`` was set).
``README.md`` (the model card) and ``config.json`` embed the library version, which a refactor does
not change.

Nothing is excluded: every file under each output directory is hashed, hidden ones included. No file
varies between runs: the library claims bit-identical checkpoints for identical inputs, and two runs
of this script on one machine gave identical hashes for every file (also with 1 and 2 threads). One
input would vary and is fixed here: a streamed checkpoint records its source directory (``base_model``
in config.json and the model card), so every case runs in its own temporary directory, as the working
directory, with relative paths (the source is ``./<model>``).

Besides the hashes, the script checks (and prints a WARNING otherwise) that the second
streamed-cache-hit run was a cache hit that wrote the same files as the first, and that streamed
weights equal the in-memory ones (streamed vs default, streamed-cache-hit vs paper). Other files of
those pairs may differ legitimately: ``base_model`` (config.json, README.md) is the source directory
only when streamed, and for Qwen2 the streamed run takes the source's tokenizer through AutoTokenizer,
which (transformers 5) makes it a ``Qwen2Tokenizer`` with another tokenizer.json.

Exit status: 0 (no --compare, or identical), 1 (differences), 2 (no case matches --cases).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models.py of the checkout this script lies in

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import optimum_a3  # noqa: E402
from optimum_a3 import A3Compressor, A3Config  # noqa: E402
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer  # noqa: E402

RATIO = 0.25
CALIBRATION = dict(n=8, seqlen=32, seed=1)  # random_token_windows arguments
MODEL_SEED = 0

# Three layers, so that sequential calibration feeds compressed layers into later ones more than once.
MODELS = {
    "llama-gqa-tied": dict(family="llama", num_heads=4, num_kv_heads=2, tie=True, layers=3),
    "llama-mha-untied": dict(family="llama", num_heads=4, num_kv_heads=4, tie=False, layers=3),
    "qwen2-gqa-untied": dict(family="qwen2", num_heads=4, num_kv_heads=2, tie=False, layers=3),
    "qwen3-gqa-tied": dict(family="qwen3", num_heads=4, num_kv_heads=2, tie=True, layers=3),
}

# mode -> (how it is run, A3Config options)
MODES = {
    "paper": ("in-memory", dict(method="paper")),
    "default": ("in-memory", dict(method="default")),
    "refit-every-token": ("in-memory", dict(method="default", refit_stride=1, nsamples=16)),
    "uniform": ("in-memory", dict(method="default", allocation="uniform")),
    "streamed": ("streamed", dict(method="default")),
    "streamed-cache-hit": ("streamed-cache-hit", dict(method="paper")),
}


# ------------------------------------------------------------------------------------ running
def a3_config(options: dict) -> A3Config:
    return A3Config(**{"ratio": RATIO, "nsamples": CALIBRATION["n"], "seqlen": CALIBRATION["seqlen"], "seed": 0,
                       **options})


def calibration_ids(options: dict) -> torch.Tensor:
    n = options.get("nsamples", CALIBRATION["n"])
    return random_token_windows(n, CALIBRATION["seqlen"], seed=CALIBRATION["seed"])


def run_in_memory(model_kwargs: dict, options: dict) -> Path:
    compressor = A3Compressor(a3_config(options))
    model = tiny_llama(seed=MODEL_SEED, **model_kwargs)
    compressed = compressor.compress(model, calibration_ids=calibration_ids(options), progress=False)
    if "refit_stride" in options and not compressed.config.a3_compression["mlp_refit"]:
        print(f"  WARNING: {options}: the down_proj refit was skipped (too few calibration tokens)")
    return Path(compressor.save(compressed, "out", tokenizer=tiny_tokenizer()))


def save_source(model_name: str, model_kwargs: dict) -> str:
    """The tiny model as a plain checkpoint (with its tokenizer) at the relative path ``./<model_name>``."""
    tiny_llama(seed=MODEL_SEED, **model_kwargs).save_pretrained(model_name)
    tiny_tokenizer().save_pretrained(model_name)
    return model_name


def run_streamed(model_name: str, model_kwargs: dict, options: dict) -> Path:
    source = save_source(model_name, model_kwargs)
    compressor = A3Compressor(a3_config(options))
    return Path(compressor.compress_checkpoint(source, "out", calibration_ids=calibration_ids(options),
                                               progress=False))


def run_streamed_cache_hit(model_name: str, model_kwargs: dict, options: dict) -> Path:
    """Two streamed runs sharing a statistics cache; the second (a cache hit) is the one hashed."""
    source = save_source(model_name, model_kwargs)
    for out in ("first", "out"):
        compressor = A3Compressor(a3_config(options))
        compressor.compress_checkpoint(source, out, calibration_ids=calibration_ids(options), progress=False,
                                       stats_cache="stats-cache")
    hit = compressor.last_timings.get("stats_cache_hit", "unknown (not reported by this library version)")
    if hit is not True:
        print(f"  WARNING: the second run of {model_name}/streamed-cache-hit was no stats-cache hit: {hit}")
    if hash_directory(Path("first")) != hash_directory(Path("out")):
        print(f"  WARNING: {model_name}/streamed-cache-hit: the cache hit wrote another checkpoint than the miss")
    return Path("out")


def run_case(model_name: str, mode: str, case_dir: Path) -> dict[str, str]:
    """Compress ``model_name`` in ``mode`` inside ``case_dir`` (the working directory, so that the paths
    the checkpoint records are relative) and return its file hashes."""
    kind, options = MODES[mode]
    model_kwargs = MODELS[model_name]
    case_dir.mkdir(parents=True)
    with contextlib.chdir(case_dir):
        if kind == "in-memory":
            out = run_in_memory(model_kwargs, options)
        elif kind == "streamed":
            out = run_streamed(model_name, model_kwargs, options)
        else:
            out = run_streamed_cache_hit(model_name, model_kwargs, options)
        return hash_directory(out)


def hash_directory(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (recursively, hidden files too), by sorted relative path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def selected_cases(filters: list[str] | None) -> list[tuple[str, str]]:
    cases = [(model, mode) for model in MODELS for mode in MODES]
    if filters:
        cases = [c for c in cases if any(f in "/".join(c) for f in filters)]
    return cases


def run_all(cases: list[tuple[str, str]], work_dir: Path) -> dict[str, dict[str, str]]:
    results = {}
    for model_name, mode in cases:
        name = f"{model_name}/{mode}"
        start = time.perf_counter()
        results[name] = run_case(model_name, mode, work_dir / f"{model_name}__{mode}")
        print(f"{name}  ({time.perf_counter() - start:.1f} s)")
        for path, digest in results[name].items():
            print(f"  {digest}  {path}")
    return results


# Pairs of modes whose weights the library promises to be the same: a streamed checkpoint equals the
# saved in-memory result of the same method and dims allocation, tensor for tensor, with or without the
# statistics cache.
SAME_WEIGHTS = (("streamed", "uniform"), ("streamed-cache-hit", "paper"))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_same_weights(results: dict[str, dict[str, str]]) -> list[str]:
    """Warnings for every model whose streamed weights differ from the in-memory ones (a library bug)."""
    warnings = []
    for model_name in MODELS:
        for streamed, in_memory in SAME_WEIGHTS:
            a, b = results.get(f"{model_name}/{streamed}"), results.get(f"{model_name}/{in_memory}")
            if a is None or b is None:
                continue
            for name in WEIGHT_FILES:
                if a.get(name) != b.get(name):
                    warnings.append(f"WARNING: {model_name}: {name} of {streamed} differs from {in_memory}'s")
    return warnings


# ---------------------------------------------------------------------------------- comparing
def differences(old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]) -> list[str]:
    """Every difference between two hash records of the same cases, one line each."""
    lines = []
    for case in sorted(set(old) | set(new)):
        if case not in new:
            lines.append(f"{case}: case missing from this run")
            continue
        if case not in old:
            lines.append(f"{case}: case not in the saved hashes")
            continue
        before, after = old[case], new[case]
        for path in sorted(set(before) | set(after)):
            if path not in after:
                lines.append(f"{case}: {path}: missing from this run (saved {before[path][:16]}...)")
            elif path not in before:
                lines.append(f"{case}: {path}: extra file, not in the saved hashes (now {after[path][:16]}...)")
            elif before[path] != after[path]:
                lines.append(f"{case}: {path}: different ({before[path][:16]}... -> {after[path][:16]}...)")
    return lines


def compare(saved_path: Path, new: dict[str, dict[str, str]], filtered: bool) -> int:
    old = json.loads(saved_path.read_text())
    if filtered:  # compare only the cases run this time
        old = {case: files for case, files in old.items() if case in new}
    diffs = differences(old, new)
    print(f"\nComparison with {saved_path}:")
    for line in diffs:
        print(f"  {line}")
    cases = set(old) | set(new)
    files = sum(len(set(old.get(case, {})) | set(new.get(case, {}))) for case in cases)
    if diffs:
        print(f"{len(cases)} cases, {files} files: {len(diffs)} differences")
        return 1
    print(f"{len(cases)} cases, {files} files: identical")
    return 0


# --------------------------------------------------------------------------------------- main
def describe_environment() -> None:
    import safetensors
    import tokenizers
    import transformers

    library = Path(optimum_a3.__file__).resolve().parents[1]
    print(f"optimum_a3 {optimum_a3.__version__} from {library}")
    if library != ROOT:
        print(f"  note: not the script's own checkout ({ROOT}); tiny models come from {ROOT / 'tests'}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"safetensors {safetensors.__version__}, tokenizers {tokenizers.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), {platform.machine()}, "
          f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '(unset)')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the hashes as JSON {\"model/mode\": {file: sha256}}")
    parser.add_argument("--compare", type=Path, help="compare with hashes saved by --out; exit 1 on any difference")
    parser.add_argument("--cases", action="append", metavar="SUBSTRING",
                        help="run only the cases whose model/mode name contains this (repeatable)")
    parser.add_argument("--keep", type=Path, help="write the checkpoints under this (new) directory and keep them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: hashes may depend on it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars
    cases = selected_cases(args.cases)
    if not cases:
        print(f"no case matches {args.cases}; cases: {[f'{m}/{d}' for m, d in selected_cases(None)]}")
        return 2
    describe_environment()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.keep:
            work_dir = args.keep.resolve()
            work_dir.mkdir(parents=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="a3-golden-")))
        results = run_all(cases, work_dir)
    n_files = sum(len(files) for files in results.values())
    print(f"\n{len(results)} cases, {n_files} files hashed in {time.perf_counter() - start:.0f} s")
    for line in check_same_weights(results):
        print(line)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    if args.compare:
        return compare(args.compare, results, filtered=bool(args.cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
