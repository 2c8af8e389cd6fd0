"""Re-run the test-suite audit: plant each small, plausible bug in a scratch copy of the library and
check that the test guarding that property fails.

    python tests/sabotage.py                 # every planted bug (a few minutes on 2 cores)
    python tests/sabotage.py --list          # names only
    python tests/sabotage.py softmax-scale   # one or more by name

Each plant is one textual change (``old`` -> ``new``, which must occur exactly once in ``file``) and
the pytest node ids that must fail with it. The scratch copy is a temporary clone of the working
tree; the library is imported from there (``PYTHONPATH``), so the working tree is never modified.
Exit status 0 when every planted bug was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Plant:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids (relative to the repository root) that must fail
    why: str = ""


PLANTS: list[Plant] = [
    # ---- config, RoPE and softmax scale ------------------------------------------------------
    Plant(name="config-drops-rms-norm-eps", file="optimum_a3/models/adapters.py",
          old='"_name_or_path", "dtype", "torch_dtype"):',
          new='"_name_or_path", "dtype", "torch_dtype", "rms_norm_eps"):',
          tests=("tests/test_exact_compression.py::test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload[eps-theta]",),
          why="the compressed config falls back to rms_norm_eps=1e-6"),
    Plant(name="config-drops-rope-parameters", file="optimum_a3/models/adapters.py",
          old='"_name_or_path", "dtype", "torch_dtype"):',
          new='"_name_or_path", "dtype", "torch_dtype", "rope_parameters"):',
          tests=("tests/test_exact_compression.py::test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload[eps-theta]",
                 "tests/test_exact_compression.py::test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload[llama3-rope]"),
          why="the compressed config falls back to rope_theta=10000 without scaling"),
    Plant(name="rope-theta-hardcoded", file="optimum_a3/models/a3_llama/modeling_a3_llama.py",
          old='base = rope_parameters["rope_theta"]',
          new="base = 10000.0",
          tests=("tests/test_exact_compression.py::test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload[eps-theta]",),
          why="the compressed model's rotary frequencies ignore the config's rope_theta"),
    Plant(name="rope-llama3-scaling-ignored", file="optimum_a3/models/a3_llama/modeling_a3_llama.py",
          old='if rope_type == "default":',
          new='if rope_type in ("default", "llama3"):',
          tests=("tests/test_exact_compression.py::test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload[llama3-rope]",),
          why="Llama-3 rope scaling (factor, low/high_freq_factor) treated as plain RoPE"),
    Plant(name="norm-eps-default-in-layers", file="optimum_a3/models/a3_llama/modeling_a3_llama.py",
          old="self.input_layernorm = A3LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)",
          new="self.input_layernorm = A3LlamaRMSNorm(config.hidden_size)",
          tests=("tests/test_exact_compression.py::test_ratio_zero_keeps_eps_rope_and_norm_weights_in_memory_and_after_reload[eps-theta]",),
          why="the compressed layers' input norm uses eps 1e-6 whatever the config says"),
    Plant(name="softmax-scale", file="optimum_a3/models/a3_llama/modeling_a3_llama.py",
          old="self.scaling = self.head_dim**-0.5",
          new="self.scaling = self.head_dim_qk**-0.5",
          tests=("tests/test_exact_compression.py::test_softmax_scale_stays_the_original_one_when_qk_shrinks[gqa-eager-vo16]",
                 "tests/test_exact_compression.py::test_softmax_scale_stays_the_original_one_when_qk_shrinks[gqa-sdpa-vo12]"),
          why="softmax scale 1/sqrt(head_dim_qk) instead of 1/sqrt(original head_dim)"),
    Plant(name="softmax-scale-sdpa-default", file="optimum_a3/models/a3_llama/modeling_a3_llama.py",
          old="scaling=self.scaling,",
          new="scaling=None if sdpa else self.scaling,",
          tests=("tests/test_exact_compression.py::test_softmax_scale_stays_the_original_one_when_qk_shrinks[gqa-sdpa-vo12]",),
          why="SDPA left at its default scale 1/sqrt(padded q/k width)"),
    # ---- solvers end to end -------------------------------------------------------------------
    Plant(name="qk-adjacent-pairs", file="optimum_a3/math/solvers.py",
          old="return dim_scores[:, :half] + dim_scores[:, half:]",
          new="return dim_scores[:, 0::2] + dim_scores[:, 1::2]",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[gqa-qk]",),
          why="rotary pairs scored as adjacent dims (2p, 2p+1), as the paper writes, not HF's half split"),
    Plant(name="qk-score-sum", file="optimum_a3/math/solvers.py",
          old="dim_scores = q_energy * k_energy",
          new="dim_scores = q_energy + k_energy",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[gqa-qk]",),
          why="QK pair score E[q^2]+E[k^2] instead of the product"),
    Plant(name="ov-gqa-blocks-not-transposed", file="optimum_a3/math/solvers.py",
          old="o_new = qh[..., :rank, :].reshape(num_kv_heads, rank, group, d_out).permute(0, 2, 1, 3)",
          new="o_new = qh[..., :rank, :].reshape(num_kv_heads, rank, group, d_out)",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[gqa-ov]",),
          why="GQA OV: the group's o_proj blocks taken without the (rank, head) transposition"),
    Plant(name="ov-gqa-singular-values-off-by-one", file="optimum_a3/math/solvers.py",
          old="v_new = v_heads @ (inv_root @ p[..., :rank] * s[..., None, :rank])",
          new="v_new = v_heads @ (inv_root @ p[..., :rank] * s[..., None, 1:rank + 1])",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[gqa-ov]",),
          why="GQA OV: singular values shifted by one (the top one dropped)"),
    Plant(name="ov-mha-root-for-inverse-root", file="optimum_a3/math/solvers.py",
          old="return (inv_root, *torch.linalg.svd(root @ o_heads, full_matrices=False))",
          new="return (root, *torch.linalg.svd(root @ o_heads, full_matrices=False))",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[mha-ov]",),
          why="MHA OV: v_proj multiplied by G_z^(1/2) instead of G_z^(-1/2) (a consistent swap of both roots "
              "would stay exact on exactly low-rank weights, and is not what this guards)"),
    Plant(name="mlp-score-ignores-down-weights", file="optimum_a3/math/solvers.py",
          old="return down_input_sq_mean.to(torch.float64) * w_down.to(torch.float64).pow(2).sum(dim=1)",
          new="return down_input_sq_mean.to(torch.float64)",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[gqa-mlp]",),
          why="MLP channels scored by their activation m_d only"),
    Plant(name="mlp-score-ignores-activations", file="optimum_a3/math/solvers.py",
          old="return down_input_sq_mean.to(torch.float64) * w_down.to(torch.float64).pow(2).sum(dim=1)",
          new="return w_down.to(torch.float64).pow(2).sum(dim=1)",
          tests=("tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[gqa-mlp]",),
          why="MLP channels scored by their down_proj norm only"),
    Plant(name="calibration-in-train-mode", file="optimum_a3/pipeline/run.py",
          old="    model.eval()\n",
          new="    pass\n",
          tests=("tests/test_compress.py::test_training_mode_is_restored_and_dropout_not_used",),
          why="the calibration forward runs a model in training mode with its attention dropout"),
    Plant(name="compressed-layers-in-train-mode", file="optimum_a3/pipeline/surgery.py",
          old="sequential calibration runs these layers (no dropout there).\n    return compressed.eval()",
          new="sequential calibration runs these layers (no dropout there).\n    return compressed",
          tests=("tests/test_compress.py::test_sequential_calibration_runs_the_compressed_layers_without_dropout",),
          why="the compressed skeleton stays in training mode, so sequential calibration applies its attention dropout"),
    Plant(name="folded-bias-wrong-group", file="optimum_a3/pipeline/layer_solver.py",
          old="per_query_head = b_v.view(g, 1, hd).expand(g, h // g, hd).reshape(h, 1, hd)",
          new="per_query_head = b_v.view(1, g, hd).expand(h // g, g, hd).reshape(h, 1, hd)",
          tests=("tests/test_families.py::test_qwen2_biases_are_carried",
                 "tests/test_exact_compression.py::test_known_low_rank_model_is_reproduced_at_ratio_quarter[qwen2-ov]"),
          why="v_proj bias folded with query head h read from KV head h % g instead of h // group"),
    Plant(name="folded-bias-mean", file="optimum_a3/pipeline/layer_solver.py",
          old="folded = (per_query_head @ w_o.view(h, hd, -1)).sum(dim=0)[0]",
          new="folded = (per_query_head @ w_o.view(h, hd, -1)).mean(dim=0)[0]",
          tests=("tests/test_families.py::test_qwen2_biases_are_carried",),
          why="v_proj bias folded as the mean over heads instead of the sum"),
    # ---- streaming, families, cache, evaluation ----------------------------------------------
    Plant(name="cache-key-ignores-version", file="optimum_a3/checkpoint/stats_cache.py",
          old="    h.update(__version__.encode())\n", new="",
          tests=("tests/test_safety_cache.py::test_the_key_changes_with_the_library_version",
                 "tests/test_safety_cache.py::test_another_library_version_does_not_reuse_the_entry"),
          why="the statistics-cache key leaves out the library version"),
    Plant(name="cache-layers-unchecked", file="optimum_a3/checkpoint/stats_cache.py",
          old='if weights_digest != self._meta["layers"][idx]["weights"]:', new="if False:",
          tests=("tests/test_safety_cache.py::test_a_model_differing_in_one_part_does_not_reuse_the_entry",),
          why="a cache entry is reused for a model whose decoder layers differ"),
    Plant(name="streaming-untied-head-from-embedding", file="optimum_a3/pipeline/sinks.py",
          old="        self.shards.add(self.weights.load(outside_layer_names(compressed), model.dtype))\n",
          new="        self.shards.add({n: self.weights.load([n.replace('lm_head', 'model.embed_tokens')], model.dtype)"
              "[n.replace('lm_head', 'model.embed_tokens')] for n in outside_layer_names(compressed)})\n",
          tests=("tests/test_streaming.py::test_streamed_equals_in_memory_for_every_head_family_and_calibration_source[untied-gqa]",),
          why="streaming writes an untied lm_head from the embedding table (passes on a tied model)"),
    Plant(name="streaming-untied-head-omitted", file="optimum_a3/pipeline/surgery.py",
          old='    if compressed.config.tie_word_embeddings:\n        names = [k for k in names if k != "lm_head.weight"]\n',
          new='    names = [k for k in names if k != "lm_head.weight"]\n',
          tests=("tests/test_streaming.py::test_streamed_equals_in_memory_for_every_head_family_and_calibration_source[qwen2-untied]",),
          why="streaming leaves an untied lm_head out of the checkpoint (reloads with a random head)"),
    Plant(name="streaming-original-layers-kept", file="optimum_a3/checkpoint/weights.py",
          old='            self.layers[idx].to("meta")\n            self.loaded.discard(idx)\n',
          new="            self.loaded.discard(idx)\n",
          tests=("tests/test_streaming.py::test_streaming_holds_one_original_and_one_compressed_layer_and_one_shard_at_a_time[paper]",),
          why="released original layers stay in memory: streaming holds the whole model after all"),
    Plant(name="streaming-compressed-layers-kept", file="optimum_a3/pipeline/sinks.py",
          old='        layer.to("meta")\n',
          new="",
          tests=("tests/test_streaming.py::test_streaming_holds_one_original_and_one_compressed_layer_and_one_shard_at_a_time[default]",),
          why="compressed layers already written to a shard are never dropped from memory"),
    Plant(name="shard-writer-overfills", file="optimum_a3/checkpoint/shards.py",
          old="if self.pending and self.pending_bytes + size > self.max_bytes:",
          new="if self.pending and self.pending_bytes > self.max_bytes:",
          tests=("tests/test_streaming.py::test_streaming_holds_one_original_and_one_compressed_layer_and_one_shard_at_a_time[paper]",),
          why="a shard is flushed only once it is over max_shard_size (buffers and files above the cap)"),
    Plant(name="eval-windows-overlap", file="optimum_a3/integrations/evaluation.py",
          old="    windows = token_ids[: num_windows * seqlen].long().view(num_windows, seqlen)\n",
          new="    windows = token_ids.long().unfold(0, seqlen, seqlen // 2)[:num_windows]\n",
          tests=("tests/test_evaluation.py::test_matches_hand_computation",),
          why="perplexity windows overlap by half (stride seqlen/2) instead of tiling the text"),
    Plant(name="eval-tail-kept", file="optimum_a3/integrations/evaluation.py",
          old="    num_windows = token_ids.numel() // seqlen\n",
          new="    num_windows = -(-token_ids.numel() // seqlen)\n"
              "    token_ids = torch.cat([token_ids, token_ids.new_zeros(num_windows * seqlen - token_ids.numel())])\n",
          tests=("tests/test_evaluation.py::test_tail_is_dropped",),
          why="the incomplete tail is evaluated as a last, zero-padded window instead of dropped"),
    Plant(name="wikitext2-local-file-ignored", file="optimum_a3/calibration/text.py",
          old="    if os.path.isfile(DEFAULT_WIKITEXT2_TEST_PATH):\n",
          new="    if False:\n",
          tests=("tests/test_evaluation.py::test_wikitext2_source_reads_the_shared_file_offline",),
          why='"wikitext2" downloads the split through datasets instead of reading the shared file (fails offline; '
              "online it would quietly download)"),
    Plant(name="default-method-not-sequential", file="optimum_a3/config.py",
          old='"default": {"allocation": "mixed", "mlp_refit": True, "sequential": True,',
          new='"default": {"allocation": "mixed", "mlp_refit": True, "sequential": False,',
          tests=("tests/test_smollm2.py::test_quickstart_command_gives_the_measured_dense_and_default_perplexities",),
          why="the library default silently becomes the paper's method (slow: the real model, minutes)"),
    Plant(name="hub-failed-upload-unexplained", file="optimum_a3/checkpoint/hub.py",
          old="    except RuntimeError as exc:\n",
          new="    except NotImplementedError as exc:\n",
          tests=("tests/test_hub.py::test_push_failing_mid_upload_says_why_in_one_line[upload]",),
          why="a weight shard the store refuses mid-push escapes as huggingface_hub's bare RuntimeError, not a "
              "one-line HubPushError"),
]


def _scratch_copy() -> str:
    # A sibling of the working tree, so that ../shared/data (WikiText-2, read relative to the project root) is
    # found from the copy too; else a temporary directory, where the tests that need that data skip.
    parent = os.path.dirname(ROOT)
    scratch = tempfile.mkdtemp(prefix="optimum-a3-sabotage-", dir=parent if os.access(parent, os.W_OK) else None)
    for name in ("optimum_a3", "tests", "model_cards", "examples", ".ci", "pyproject.toml", "README.md"):
        source = os.path.join(ROOT, name)
        target = os.path.join(scratch, name)
        if os.path.isdir(source):
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif os.path.exists(source):
            shutil.copy2(source, target)
    return scratch


def _apply(scratch: str, plant: Plant) -> None:
    path = os.path.join(scratch, plant.file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(plant.old)
    if count != 1:
        raise SystemExit(f"{plant.name}: the text to change occurs {count} times in {plant.file} (must be once): "
                         "the library changed, update the plant")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(plant.old, plant.new))


def _run_tests(scratch: str, tests: tuple[str, ...], timeout: float) -> tuple[bool, str]:
    env = dict(os.environ, PYTHONPATH=scratch + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return proc.returncode != 0, tail[0]


def _library_imported_from(scratch: str) -> str:
    env = dict(os.environ, PYTHONPATH=scratch)
    out = subprocess.run([sys.executable, "-c", "import optimum_a3, os; print(os.path.dirname(optimum_a3.__file__))"],
                         cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="plants to run (default all)")
    parser.add_argument("--list", action="store_true", help="list the plants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per plant")
    args = parser.parse_args(argv)
    plants = [p for p in PLANTS if not args.names or p.name in args.names]
    unknown = set(args.names) - {p.name for p in PLANTS}
    if unknown:
        parser.error(f"unknown plants: {sorted(unknown)}")
    if args.list:
        for p in plants:
            print(f"{p.name}: {p.file}: {p.why}")
        return 0
    caught = 0
    for plant in plants:
        scratch = _scratch_copy()
        try:
            _apply(scratch, plant)
            imported = _library_imported_from(scratch)
            if os.path.realpath(imported) != os.path.realpath(os.path.join(scratch, "optimum_a3")):
                raise SystemExit(f"the scratch copy's library is not the one imported ({imported})")
            failed, tail = _run_tests(scratch, plant.tests, args.timeout)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        caught += failed
        print(f"{'caught' if failed else 'MISSED'}  {plant.name}  ({', '.join(plant.tests)}): {tail}", flush=True)
    print(f"{caught} of {len(plants)} planted bugs caught")
    return 0 if caught == len(plants) else 1


if __name__ == "__main__":
    sys.exit(main())
