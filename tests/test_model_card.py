"""Model cards rendered from the compression record: Hub metadata header, honest figures, loading snippet."""

import re

import pytest
import yaml

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.math.budget import decoder_linear_params, kv_cache_bytes_per_token, total_params
from optimum_a3.checkpoint.model_card import (CARD_MARKER, ModelCardError, card_context, render_model_card, size_figures,
                                   write_model_card)
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(4, 32, seed=21)


def compressed(base_name="tiny-org/tiny-llama", **kwargs):
    model = tiny_llama()
    model.config._name_or_path = base_name
    config = A3Config(**({"ratio": 0.25} | kwargs))
    return model, A3Compressor(config).compress(model, calibration_ids=CALIB, progress=False)


def header(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_header_parses_and_carries_the_hub_fields():
    _, small = compressed()
    card = render_model_card(small, repo_id="a3-tester/tiny-a3", license_lookup=lambda base: {"license": "mit"})
    meta = header(card)
    assert meta["base_model"] == "tiny-org/tiny-llama"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"a3", "low-rank", "llama"} <= set(meta["tags"])
    assert meta["license"] == "mit"  # inherited from the base model's card
    assert "metrics" not in meta  # nothing was evaluated
    assert CARD_MARKER in card
    snippet = 'AutoModelForCausalLM.from_pretrained("a3-tester/tiny-a3", trust_remote_code=True)'
    assert snippet in card
    assert 'pipeline("text-generation", model="a3-tester/tiny-a3", trust_remote_code=True)' in card


def test_body_reports_the_record_and_exact_sizes():
    model, small = compressed(allocation="uniform")
    card = render_model_card(small, repo_id="a3-tester/tiny-a3")
    assert "| Target ratio | 25% of the decoder-layer projection parameters removed |" in card
    assert "| query/key | `head_dim_qk` | 16 | 12 |" in card
    assert "| value/output | `head_dim_vo` | 16 | 12 |" in card
    assert "| MLP | `intermediate_size` | not recorded | 72 |" in card  # base MLP width is not in the record
    assert "4 windows of 32 tokens (128 tokens)" in card and "token ids supplied by the user (seed 0)" in card
    assert "No evaluation was recorded" in card and "Perplexity |" not in card
    # figures derived from the config equal the counts on the model itself
    sizes = size_figures(small.config.to_dict())
    assert sizes["decoder_linear_params"][1] == decoder_linear_params(small)
    assert sizes["total_params"][1] == total_params(small)
    assert sizes["kv_cache_bytes_per_token"] == (kv_cache_bytes_per_token(model), kv_cache_bytes_per_token(small))
    assert "| KV cache per token (float32) | 512 B | 384 B | 25.0% |" in card
    assert f"{decoder_linear_params(small):,}" in card


def test_recorded_sizes_and_evaluation_are_shown_and_only_then():
    model, small = compressed()
    record = small.config.a3_compression
    record["sizes"] = {"decoder_linear_params": [decoder_linear_params(model), decoder_linear_params(small)],
                       "total_params": [total_params(model), total_params(small)],
                       "kv_cache_bytes_per_token": [kv_cache_bytes_per_token(model), kv_cache_bytes_per_token(small)]}
    record["evaluation"] = {"source": "wikitext2", "seqlen": 2048, "max_windows": 8, "ppl_dense": 12.5,
                            "ppl_compressed": 15.0}
    card = render_model_card(small, repo_id="a3-tester/tiny-a3")
    assert header(card)["metrics"] == ["perplexity"]
    dense, small_count = record["sizes"]["decoder_linear_params"]
    assert f"| Decoder-layer linear parameters | {dense:,} ({dense / 1e3:.2f} K) | {small_count:,} " in card
    assert f"| {100 * (dense - small_count) / dense:.1f}% |" in card
    assert "Perplexity on `wikitext2` (2048-token windows, first 8)" in card
    assert "| Base (dense) | 12.500 |" in card and "| A3-compressed | 15.000 (+20.0% vs. dense) |" in card
    assert "No evaluation was recorded" not in card


def test_recovery_fine_tune_is_described_only_when_it_ran():
    _, small = compressed()
    assert "Recovery fine-tune" not in render_model_card(small) and "without any fine-tuning" in render_model_card(small)
    record = small.config.a3_compression
    record["recovery"] = {"method": "lora", "rank": 8, "alpha": 16, "steps": 300, "batch_size": 1, "seqlen": 256,
                          "learning_rate": 3e-4, "dataset": "wikipedia-offline:train", "tokens": 76800, "seed": 0,
                          "loss_first_steps": 3.25, "loss_last_steps": 2.5}
    record["evaluation"] = {"source": "wikitext2", "seqlen": 2048, "max_windows": 12, "ppl_dense": None,
                            "ppl_compressed": 37.5, "ppl_before_recovery": 39.25}
    card = render_model_card(small)
    assert "LoRA (rank 8, alpha 16) for\n300 steps of 1 × 256 tokens (76,800\ntokens)" in card
    assert "Training loss went from 3.250 (first steps) to 2.500 (last steps)." in card
    assert "| A3-compressed, before the recovery fine-tune | 39.250 |" in card
    assert "| A3-compressed + LoRA recovery | 37.500 |" in card and "Base (dense)" not in card
    assert "with only a short LoRA fine-tune afterwards" in card
    assert "on the next-token loss." in card and "distilled" not in card
    # A fine-tune of the weights themselves, distilled from the dense model.
    record["recovery"] = {**record["recovery"], "method": "weights", "objective": "distillation",
                          "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "temperature": 2.0}
    del record["recovery"]["rank"], record["recovery"]["alpha"]
    card = render_model_card(small)
    assert "the weights of its projections were fine-tuned directly for\n300 steps" in card and "LoRA" not in card
    assert "distilled from `HuggingFaceTB/SmolLM2-135M-Instruct` (the KL divergence from its next-token " in card
    assert "temperature 2.0)" in card and "merged" not in card
    assert "| A3-compressed + weight distillation recovery | 37.500 |" in card
    assert "with only a short weight fine-tune afterwards" in card


def test_per_layer_dims_license_from_local_base_and_write(tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: llama3.1\n---\n# base\n")
    model = tiny_llama()
    model.config._name_or_path = str(base)
    small = A3Compressor(A3Config(head_dim_qk=[16, 8], head_dim_vo=[4, 16], intermediate_size=[96, 40])).compress(
        model, calibration_ids=CALIB, progress=False)
    out = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.0)).save(small, out, tokenizer=tiny_tokenizer())
    path = write_model_card(small, out)
    card = open(path).read()
    meta = header(card)
    assert meta["license"] == "llama3.1"
    assert "base_model" not in meta  # a local directory is not a Hub id
    assert "`base` (a local model)" in card
    assert "| MLP | `intermediate_size` | 96 | 40–96 (per layer below) |" in card  # base config is local
    assert "| 0 | 16 | 4 | 96 |" in card and "| 1 | 8 | 16 | 40 |" in card
    assert "AutoTokenizer.from_pretrained" in card  # the tokenizer was saved next to the model
    assert card_context(out)["sizes"][0]["base"].startswith(f"{decoder_linear_params(model):,}")


def test_unknown_license_is_omitted_and_no_tokenizer_snippet():
    _, small = compressed(base_name="")
    card = render_model_card(small, has_tokenizer=False)
    meta = header(card)
    assert "license" not in meta and "base_model" not in meta
    assert "AutoTokenizer" not in card and "use the base model's tokenizer" in card
    assert 'from_pretrained("path/to/this/checkpoint", trust_remote_code=True)' in card


def test_not_an_a3_model_is_refused():
    with pytest.raises(ModelCardError, match="a3_compression"):
        render_model_card(tiny_llama())


def test_the_cards_pipeline_snippet_works_on_a_saved_checkpoint(tmp_path):
    from transformers import pipeline

    _, small = compressed()
    tok = tiny_tokenizer()
    out = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.0)).save(small, out, tokenizer=tok)
    generator = pipeline("text-generation", model=str(out), trust_remote_code=True)
    assert type(generator.model).__name__ == "A3LlamaForCausalLM"
    prompt = "The quick brown fox"
    result = generator(prompt, max_new_tokens=8, do_sample=False, return_full_text=True)[0]["generated_text"]
    ids = tok(prompt, return_tensors="pt").input_ids
    new_tokens = small.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert result == prompt + tok.decode(new_tokens, skip_special_tokens=True)  # greedy, same as the model's own
