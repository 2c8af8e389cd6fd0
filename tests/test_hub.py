"""Push to a live (local) Hub API and load back by repo id in a fresh process.

The Hub is ``tests/hub_server.py``: a real HTTP server on 127.0.0.1 speaking the endpoints ``huggingface_hub``
calls (create repo, preupload, LFS batch + signed PUT + verify, NDJSON commit, model info, tree, resolve with
redirects to a separate storage origin), with bearer-token checks. The library reaches it only through
``huggingface_hub``: in this process by patching its endpoint constants, in subprocesses through ``HF_ENDPOINT``.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.hub import CheckpointError, HubPushError, check_hub_access, push_folder_to_hub, push_to_hub
from optimum_a3.model_card import CARD_MARKER
from hub_server import FakeHub, client_env, patch_client
from reload_helpers import reload_in_fresh_process, save_reference
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(4, 32, seed=31)
PROBE = random_token_windows(2, 24, seed=32)
REPO = "a3-tester/tiny-a3"


@pytest.fixture(scope="module")
def hub():
    with FakeHub(lifetime=1800) as server:
        yield server


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture
def client(hub, hf_home, monkeypatch):
    patch_client(monkeypatch, hub, hf_home)
    return hub


@pytest.fixture(scope="module")
def pushed(hub, hf_home, tmp_path_factory):
    """A tiny compressed model pushed once with the right token (compressor API), and its reference outputs."""
    model = tiny_llama()
    model.config._name_or_path = "tiny-org/tiny-llama"
    compressor = A3Compressor(A3Config(ratio=0.25))
    small = compressor.compress(model, calibration_ids=CALIB, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        patch_client(mp, hub, hf_home)
        before = len(hub.log)
        info = compressor.push_to_hub(small, REPO, tokenizer=tiny_tokenizer(), token=hub.token,
                                      commit_message="Upload tiny A3 model")
    ref = tmp_path_factory.mktemp("ref") / "ref.pt"
    save_reference(small, PROBE, ref)
    return {"model": small, "info": info, "ref": ref, "log": hub.log[before:]}


def _snapshot(hub, repo):
    return hub.commit_count(repo), hub.files(repo) if repo in hub.repos else None


def test_push_is_one_commit_with_everything_then_fresh_process_loads_by_repo_id(hub, pushed, hf_home, tmp_path):
    info = pushed["info"]
    repo = hub.repos[REPO]
    assert info.oid == repo.refs["main"] and hub.commit_count(REPO) == 2  # the repo's initial commit + ours
    assert repo.commits[-1].summary == "Upload tiny A3 model"
    files = hub.files(REPO)
    assert {"config.json", "model.safetensors", "modeling_a3_llama.py", "configuration_a3_llama.py",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert repo.resolve("main").files["model.safetensors"].lfs_oid is not None  # went through git-LFS
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_a3_llama.A3LlamaForCausalLM"
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "tiny-org/tiny-llama" and meta["library_name"] == "transformers"
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in card

    # the client's upload sequence, as huggingface_hub actually calls it
    calls = [(m, p.split("?")[0], s) for m, p, s in pushed["log"]]
    steps = [("POST", "/api/repos/create", 200), ("POST", "/api/validate-yaml", 200),
             ("POST", f"/api/models/{REPO}/preupload/main", 200), ("POST", f"/{REPO}.git/info/lfs/objects/batch", 200),
             ("PUT", "/upload/", 200), ("POST", f"/{REPO}.git/info/lfs/objects/verify", 200),
             ("POST", f"/api/models/{REPO}/commit/main", 200)]
    positions = [next(i for i, (m, p, s) in enumerate(calls) if (m, s) == step[::2] and p.startswith(step[1]))
                 for step in steps]
    assert positions == sorted(positions), calls
    assert sum(1 for m, p, s in calls if "/commit/" in p) == 1

    # a fresh process, optimum_a3 blocked, plain transformers, by repo id through HF_ENDPOINT
    start = len(hub.log)
    reload_in_fresh_process(REPO, pushed["ref"], cwd=tmp_path, env=client_env(hub, str(tmp_path / "fresh_home")))
    downloads = [(m, p.split("?")[0], s) for m, p, s in hub.log[start:]]
    assert ("HEAD", f"/{REPO}/resolve/{info.oid}/model.safetensors", 302) in downloads  # LFS: redirect to storage
    assert any(m == "GET" and p.startswith("/objects/") and s == 200 for m, p, s in downloads)


def test_wrong_token_fails_clearly_and_publishes_nothing(hub, client, pushed):
    small = pushed["model"]
    with pytest.raises(HubPushError) as err:
        push_to_hub(small, "a3-tester/never-created", token="hf_wrong_token")
    message = str(err.value)
    assert "\n" not in message
    assert "rejected the token (HTTP 401: Invalid credentials in Authorization header)" in message
    assert "nothing was published" in message
    assert "a3-tester/never-created" not in hub.repos

    before = _snapshot(hub, REPO)
    start = len(hub.log)
    small.config.a3_compression["note"] = "changed"  # a different config.json would be a real change
    try:
        with pytest.raises(HubPushError, match="rejected the token"):
            push_to_hub(small, REPO, token="hf_wrong_token")
    finally:
        del small.config.a3_compression["note"]
    assert _snapshot(hub, REPO) == before
    assert all(s == 401 for m, p, s in hub.log[start:] if m in ("POST", "PUT")), hub.log[start:]


def test_repush_replaces_stale_weights_and_keeps_a_users_card(hub, client, pushed, tmp_path):
    small = pushed["model"]
    ckpt = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.0)).save(small, ckpt, tokenizer=tiny_tokenizer(), max_shard_size="60KB")
    assert (ckpt / "model.safetensors.index.json").is_file()
    (ckpt / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    info = push_folder_to_hub(ckpt, "tiny-a3-sharded", token=hub.token)  # no namespace: the token's user
    assert info.repo_url.repo_id == "a3-tester/tiny-a3-sharded"
    files = hub.files("a3-tester/tiny-a3-sharded")
    assert files["README.md"] == b"---\nlicense: mit\n---\n# My own card\n"

    # the same weights, now sharded, over the single-file push: the old model.safetensors must go
    push_folder_to_hub(ckpt, REPO, token=hub.token, commit_message="Shard the weights")
    files = hub.files(REPO)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 1
    assert CARD_MARKER not in files["README.md"].decode()  # the user's card was kept


def test_private_push_and_access_checks(hub, client, pushed):
    info = push_to_hub(pushed["model"], "a3-tester/private-a3", token=hub.token, private=True)
    assert hub.repos["a3-tester/private-a3"].private and info.oid
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("a3-tester/private-a3")
    assert HfApi(token=hub.token).model_info("a3-tester/private-a3").sha == info.oid

    assert check_hub_access(REPO, token=hub.token) == "a3-tester"
    with pytest.raises(HubPushError, match="rejected the token"):
        check_hub_access(REPO, token="hf_wrong_token")
    with pytest.raises(HubPushError, match="invalid repo id"):
        check_hub_access("not a/valid//id", token=hub.token)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_hub_access(REPO)
    with pytest.raises(HubPushError, match="cannot write to someone-else/x"):
        push_to_hub(pushed["model"], "someone-else/x", token=hub.token)


def test_incomplete_directory_is_refused_before_any_request(hub, client, tmp_path):
    start = len(hub.log)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="a3_compression"):
        push_folder_to_hub(tmp_path, REPO, token=hub.token)
    with pytest.raises(CheckpointError, match="not a directory"):
        push_folder_to_hub(tmp_path / "missing", REPO, token=hub.token)
    assert len(hub.log) == start


def test_console_script_push_through_hf_endpoint(hub, pushed, tmp_path):
    ckpt = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.0)).save(pushed["model"], ckpt, tokenizer=tiny_tokenizer())
    env = client_env(hub, str(tmp_path / "home"), HF_TOKEN=hub.token)
    script = Path(sys.executable).with_name("optimum-a3")  # the installed console script
    assert script.is_file(), script
    proc = subprocess.run([str(script), "push", str(ckpt), "a3-tester/from-cli", "--license", "apache-2.0"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["repo_id"] == "a3-tester/from-cli" and out["commit"] == hub.repos["a3-tester/from-cli"].refs["main"]
    card = hub.files("a3-tester/from-cli")["README.md"].decode()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "apache-2.0"
    assert 'from_pretrained("a3-tester/from-cli", trust_remote_code=True)' in card


# In a fresh process: load a quantized checkpoint by repo id the way the CLI does, compare with the reference.
LOAD_QUANTIZED = """
import json, sys, torch
from optimum_a3.loading import load_model_and_tokenizer
model, tokenizer = load_model_and_tokenizer(sys.argv[1])
ref = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ref["input_ids"]).logits
print(json.dumps({"logits_equal": bool(torch.equal(logits, ref["logits"])), "vocab": len(tokenizer),
                  "quantized_layers": sum(type(m).__name__ == "HQQLinear" for m in model.modules())}))
"""


def test_quantized_model_is_pushed_in_its_format_and_loads_by_repo_id(hub, client, pushed, tmp_path):
    from optimum_a3.quantization import quantize_model

    repo_id = "a3-tester/tiny-a3-hqq4"
    quantized = quantize_model(copy.deepcopy(pushed["model"]), backend="hqq", bits=4)
    push_to_hub(quantized, repo_id, tokenizer=tiny_tokenizer(), token=hub.token)
    files = hub.files(repo_id)
    assert {"config.json", "qmodel.pt", "README.md", "tokenizer.json"} <= set(files)
    assert not any(name.endswith(".safetensors") for name in files)  # from_pretrained has nothing to misread
    assert json.loads(files["config.json"])["a3_quantization"]["backend"] == "hqq"
    card = files["README.md"].decode()
    assert f'load_quantized("{repo_id}")' in card and "## Quantization" in card

    with torch.no_grad():
        torch.save({"input_ids": PROBE, "logits": quantized(PROBE).logits}, tmp_path / "ref.pt")
    env = client_env(hub, str(tmp_path / "fresh_home"))
    proc = subprocess.run([sys.executable, "-c", LOAD_QUANTIZED, repo_id, str(tmp_path / "ref.pt")], env=env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"logits_equal": True, "vocab": len(tiny_tokenizer()), "quantized_layers": 14}


def test_quantized_checkpoint_without_its_weights_is_refused(hub, client, pushed, tmp_path):
    from optimum_a3.quantization import quantize_model, save_quantized

    directory = Path(save_quantized(quantize_model(copy.deepcopy(pushed["model"]), backend="hqq"), tmp_path / "q"))
    (directory / "qmodel.pt").unlink()
    start = len(hub.log)
    with pytest.raises(CheckpointError, match="hqq-quantized checkpoint without qmodel.pt"):
        push_folder_to_hub(directory, REPO, token=hub.token)
    assert len(hub.log) == start
