"""``optimum-a3 eval --tasks`` (lm-evaluation-harness) offline: local tasks written here, run on a tiny A3
checkpoint and its dense base; accuracies checked against the same log-likelihoods computed by hand."""

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("lm_eval", reason="lm-eval is the 'eval' extra (installed with 'test')")

from optimum_a3 import A3Compressor, A3Config  # noqa: E402
from optimum_a3.cli import main  # noqa: E402
from optimum_a3.integrations.zero_shot import ZeroShotError, evaluate_zero_shot, to_markdown  # noqa: E402
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer  # noqa: E402

CALIB = random_token_windows(6, 32, seed=5)
MC_TASK, ROLLING_TASK = "a3_tiny_mc", "a3_tiny_rolling"
# Choices of different lengths, so that acc (sum of log-probs) and acc_norm (per character) can differ.
MC_DOCS = [{"question": f"Question {i}: which word follows {w}?",
            "choices": [w, w + " again", "no", "the end of it"], "label": i % 4}
           for i, w in enumerate(["red", "blue", "quick fox", "seven", "lazy dog", "king", "wizard", "vex",
                                  "jovial", "brown"])]
ROLLING_DOCS = [{"text": f"the quick brown fox {i} jumps over the lazy dog while {i + 3} wizards vex a king"}
                for i in range(4)]


def _task_yaml(task: str, data: str, body: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


MC_BODY = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING_BODY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny Llama (saved), its A3 compression (saved), and a folder with the two local lm-eval tasks."""
    root = tmp_path_factory.mktemp("zero_shot")
    base, tok = tiny_llama(), tiny_tokenizer()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    compressor = A3Compressor(A3Config(ratio=0.25))
    compressor.save(compressor.compress(base, calibration_ids=CALIB, progress=False), root / "a3", tokenizer=tok)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, docs, body in ((MC_TASK, MC_DOCS, MC_BODY), (ROLLING_TASK, ROLLING_DOCS, ROLLING_BODY)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (tasks / f"{name}.yaml").write_text(_task_yaml(name, str(data), body))
    return root


def run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, match: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("optimum-a3 eval: error: ")]
    assert len(errors) == 1, err
    assert match in errors[0], errors[0]


# ------------------------------------------------------------------ hand computations
def _continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log p(continuation token | everything before it), from one forward of the model."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
    return logp[positions, torch.tensor(continuation)].sum().item()


def hand_multiple_choice(model, tok) -> dict:
    """lm-eval's multiple-choice protocol: context = the question, continuation = " " + choice; acc picks
    the largest sum of log-probs, acc_norm the largest per character of the choice."""
    acc = acc_norm = 0
    for doc in MC_DOCS:
        context = tok.encode(doc["question"], add_special_tokens=False)
        lls = [_continuation_logprob(model, context, tok.encode(" " + c, add_special_tokens=False))
               for c in doc["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    return {"acc": acc / len(MC_DOCS), "acc_norm": acc_norm / len(MC_DOCS)}


def hand_rolling(model, tok) -> dict:
    """Each text scored after the BOS token (one window: the texts are shorter than the context)."""
    ll = sum(_continuation_logprob(model, [tok.bos_token_id], tok.encode(d["text"], add_special_tokens=False))
             for d in ROLLING_DOCS)
    words = sum(len(re.split(r"\s+", d["text"])) for d in ROLLING_DOCS)
    n_bytes = sum(len(d["text"].encode()) for d in ROLLING_DOCS)
    return {"word_perplexity": math.exp(-ll / words), "bits_per_byte": -ll / n_bytes / math.log(2)}


def _reference(path):
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # plain transformers (A3: the registered class)
    tok = tiny_tokenizer()
    return {**hand_multiple_choice(model, tok), **hand_rolling(model, tok)}


# ------------------------------------------------------------------ happy paths
def test_cli_scores_the_a3_checkpoint_and_its_base_like_a_hand_computation(root, tmp_path, capsys):
    out = tmp_path / "results"
    code, stdout, err = run(capsys, ["eval", root / "a3", "--tasks", f"{MC_TASK},{ROLLING_TASK}", "--base",
                                     root / "base", "--include-path", root / "tasks", "--batch-size", 3,
                                     "--device", "cpu", "--output-dir", out])
    assert code == 0, err
    result = json.loads(stdout)
    assert result["tasks"] == [MC_TASK, ROLLING_TASK] and result["lm_eval_version"]
    assert result["model"]["name"] == str(root / "a3") and result["base"]["name"] == str(root / "base")
    for role, path in (("model", root / "a3"), ("base", root / "base")):
        tasks, expected = result[role]["tasks"], _reference(path)
        mc, rolling = tasks[MC_TASK], tasks[ROLLING_TASK]
        assert mc["samples"] == len(MC_DOCS) and mc["num_fewshot"] == 0 and rolling["samples"] == len(ROLLING_DOCS)
        assert mc["acc"] == pytest.approx(expected["acc"], abs=1e-12), role
        assert mc["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12), role
        assert mc["acc_stderr"] > 0
        assert rolling["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=1e-4), role
        assert rolling["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-4), role
    # Each row is its own model's (the compressed model scores the text differently).
    assert result["model"]["tasks"][ROLLING_TASK]["word_perplexity"] != pytest.approx(
        result["base"]["tasks"][ROLLING_TASK]["word_perplexity"], rel=1e-6)

    assert json.loads((out / "zero_shot.json").read_text()) == result
    table = (out / "zero_shot.md").read_text()
    assert table == to_markdown(result) and table.strip() in err  # the table is also shown on stderr
    header = next(line for line in table.splitlines() if line.startswith("| role"))
    assert f"{MC_TASK} acc | {MC_TASK} acc_norm | {ROLLING_TASK} word_perplexity" in header
    assert "mean acc" not in header  # one task with an accuracy: no average column
    rows = [line for line in table.splitlines() if line.startswith(("| model", "| base"))]
    assert len(rows) == 2 and f"{result['model']['tasks'][MC_TASK]['acc']:.4f}" in rows[0]


def test_python_function_with_limit_and_few_shot(root):
    result = evaluate_zero_shot(str(root / "a3"), MC_TASK, include_path=str(root / "tasks"), limit=4,
                                num_fewshot=1, device="cpu", bootstrap_iters=0)
    assert result["base"] is None and result["settings"]["limit"] == 4
    mc = result["model"]["tasks"][MC_TASK]
    assert mc["samples"] == 4 and mc["num_fewshot"] == 1 and 0 <= mc["acc"] <= 1
    assert mc["acc_stderr"] is None  # bootstrap_iters=0: lm-eval computes no stderr
    assert "at most 4 documents" in to_markdown(result) and "1-shot" in to_markdown(result)


# ------------------------------------------------------------------ clear errors
def test_unknown_task_is_a_one_line_error(root, capsys):
    code, stdout, err = run(capsys, ["eval", root / "a3", "--tasks", "arc_eazy", "--device", "cpu"])
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "unknown task 'arc_eazy' (did you mean arc_easy")
    with pytest.raises(ZeroShotError, match="unknown task 'no_such_task'"):
        evaluate_zero_shot(str(root / "a3"), [MC_TASK, "no_such_task"], include_path=str(root / "tasks"))


def test_task_data_offline_is_a_one_line_error(root, capsys, monkeypatch):
    # conftest runs the suite offline with an empty HF_HOME: lm-eval's arc_easy data cannot be fetched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, stdout, err = run(capsys, ["eval", root / "a3", "--tasks", "arc_easy", "--device", "cpu"])
    assert code == 2 and stdout == ""
    assert_one_line_error(err, "task 'arc_easy': its data cannot be fetched offline")
    assert "[model] loading" not in err  # refused before any model is loaded


@pytest.fixture(scope="module")
def not_causal(tmp_path_factory):
    """A T5 (no AutoModelForCausalLM class) and a BERT (loads as BertLMHeadModel, but bidirectional)."""
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("not_causal")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    bert = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, initializer_range=0.5))
    for name, model in (("t5", t5), ("bert", bert)):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


@pytest.mark.parametrize("name", ["t5", "bert"])
def test_a_model_that_is_not_a_causal_lm_is_a_one_line_error(root, not_causal, name, capsys):
    code, stdout, err = run(capsys, ["eval", not_causal / name, "--tasks", MC_TASK, "--include-path", root / "tasks",
                                     "--device", "cpu"])
    assert code == 2 and stdout == ""
    assert_one_line_error(err, f"{not_causal / name} is not a causal LM")


def test_lm_eval_options_need_tasks(root, capsys):
    code, stdout, err = run(capsys, ["eval", root / "a3", "--base", root / "base"])
    assert code == 2
    assert_one_line_error(err, "--base is an lm-eval option: it needs --tasks")


def test_benchmark_script_adds_lm_eval_columns(root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(d["text"] for d in ROLLING_DOCS) for _ in range(20)))
    out = tmp_path / "bench"
    args = ["--model", root / "base", "--ratios", 0.25, "--methods", "svd", "--calibration", text, "--nsamples", 2,
            "--seqlen", 32, "--eval-source", text, "--eval-seqlen", 32, "--eval-windows", 2, "--prefill-batch", 1,
            "--prefill-seqlen", 16, "--decode-tokens", 2, "--repeats", 1, "--out", out,
            "--tasks", MC_TASK, "--include-path", root / "tasks", "--tasks-batch-size", 4]
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "svd"]
    dense = rows[0]["lm_eval"][MC_TASK]
    assert dense["samples"] == len(MC_DOCS)
    assert dense["acc"] == pytest.approx(_reference(root / "base")["acc"], abs=1e-12)  # the dense row is the base
    assert 0 <= rows[1]["lm_eval"][MC_TASK]["acc"] <= 1
    table = (out / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.endswith(f"| {MC_TASK} acc | {MC_TASK} acc_norm |")
    assert f"{dense['acc']:.4f} |" in next(line for line in table.splitlines() if line.startswith("| dense"))


def test_plain_lm_eval_route_gives_the_same_numbers(root):
    """README's plain route (lm-eval loads the checkpoint itself, with its shipped modeling code)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    plain = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={root / 'a3'},trust_remote_code=True",
                                    tasks=[MC_TASK], device="cpu", batch_size=4, log_samples=False,
                                    task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False))
    ours = evaluate_zero_shot(str(root / "a3"), MC_TASK, include_path=str(root / "tasks"), device="cpu", batch_size=4)
    for metric in ("acc", "acc_norm"):
        assert ours["model"]["tasks"][MC_TASK][metric] == plain["results"][MC_TASK][f"{metric},none"]
