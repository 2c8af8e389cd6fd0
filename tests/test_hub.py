"""Push to a live (local) Hub API and load back by repo id in a fresh process.

The Hub is ``tests/hub_server.py``: a real HTTP server on 127.0.0.1 speaking the endpoints ``huggingface_hub``
calls (create repo, preupload, LFS batch + signed PUT + verify, NDJSON commit, model info, tree, resolve with
redirects to a separate storage origin), with bearer-token checks. The library reaches it only through
``huggingface_hub``: in this process by patching its endpoint constants, in subprocesses through ``HF_ENDPOINT``.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.checkpoint.hub import CheckpointError, HubPushError, check_hub_access, push_folder_to_hub, push_to_hub
from optimum_a3.checkpoint.model_card import CARD_MARKER
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
def compressed(tmp_path_factory):
    """A tiny compressed model (compressed once per module, never changed by a test) and its reference outputs."""
    model = tiny_llama()
    model.config._name_or_path = "tiny-org/tiny-llama"
    # Uniform dims: the MLP weights (72 x 48 values) split into hqq's groups of 64, which a mixed width need not.
    compressor = A3Compressor(A3Config(ratio=0.25, allocation="uniform"))
    small = compressor.compress(model, calibration_ids=CALIB, progress=False)
    ref = tmp_path_factory.mktemp("ref") / "ref.pt"
    save_reference(small, PROBE, ref)
    return {"compressor": compressor, "model": small, "ref": ref}


@pytest.fixture
def repo_id(request):
    """A repository of this test's own: tests share the server, never a repository, so any order passes."""
    name = f"{REPO}-{re.sub(r'[^A-Za-z0-9]+', '_', request.node.name.removeprefix('test_')).strip('_')[-60:]}"
    assert name not in request.getfixturevalue("hub").repos, name
    return name


@pytest.fixture
def pushed(compressed, client, repo_id):
    """``compressed`` pushed with the right token (compressor API) to this test's own repository."""
    before = len(client.log)
    info = compressed["compressor"].push_to_hub(compressed["model"], repo_id, tokenizer=tiny_tokenizer(),
                                                token=client.token, commit_message="Upload tiny A3 model")
    return {**compressed, "repo": repo_id, "info": info, "log": client.log[before:]}


def _snapshot(hub, repo):
    return hub.commit_count(repo), hub.files(repo) if repo in hub.repos else None


def test_push_is_one_commit_with_everything_then_fresh_process_loads_by_repo_id(hub, pushed, tmp_path):
    info, repo_id = pushed["info"], pushed["repo"]
    repo = hub.repos[repo_id]
    assert info.oid == repo.refs["main"] and hub.commit_count(repo_id) == 2  # the repo's initial commit + ours
    assert repo.commits[-1].summary == "Upload tiny A3 model"
    files = hub.files(repo_id)
    assert {"config.json", "model.safetensors", "modeling_a3_llama.py", "configuration_a3_llama.py",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert repo.resolve("main").files["model.safetensors"].lfs_oid is not None  # went through git-LFS
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_a3_llama.A3LlamaForCausalLM"
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "tiny-org/tiny-llama" and meta["library_name"] == "transformers"
    assert f'AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)' in card

    # the client's upload sequence, as huggingface_hub actually calls it
    calls = [(m, p.split("?")[0], s) for m, p, s in pushed["log"]]
    steps = [("POST", "/api/repos/create", 200), ("POST", "/api/validate-yaml", 200),
             ("POST", f"/api/models/{repo_id}/preupload/main", 200),
             ("POST", f"/{repo_id}.git/info/lfs/objects/batch", 200), ("PUT", "/upload/", 200),
             ("POST", f"/{repo_id}.git/info/lfs/objects/verify", 200), ("POST", f"/api/models/{repo_id}/commit/main", 200)]
    positions = [next(i for i, (m, p, s) in enumerate(calls) if (m, s) == step[::2] and p.startswith(step[1]))
                 for step in steps]
    assert positions == sorted(positions), calls
    assert sum(1 for m, p, s in calls if "/commit/" in p) == 1

    # a fresh process, optimum_a3 blocked, plain transformers, by repo id through HF_ENDPOINT
    start = len(hub.log)
    reload_in_fresh_process(repo_id, pushed["ref"], cwd=tmp_path, env=client_env(hub, str(tmp_path / "fresh_home")))
    downloads = [(m, p.split("?")[0], s) for m, p, s in hub.log[start:]]
    assert ("HEAD", f"/{repo_id}/resolve/{info.oid}/model.safetensors", 302) in downloads  # LFS: redirect to storage
    assert any(m == "GET" and p.startswith("/objects/") and s == 200 for m, p, s in downloads)


def test_wrong_token_fails_clearly_and_publishes_nothing(hub, client, pushed):
    small, repo_id = pushed["model"], pushed["repo"]
    never = f"{repo_id}-never-created"
    with pytest.raises(HubPushError) as err:
        push_to_hub(small, never, token="hf_wrong_token")
    message = str(err.value)
    assert "\n" not in message
    assert "rejected the token (HTTP 401: Invalid credentials in Authorization header)" in message
    assert "nothing was published" in message
    assert never not in hub.repos

    before = _snapshot(hub, repo_id)
    start = len(hub.log)
    small.config.a3_compression["note"] = "changed"  # a different config.json would be a real change
    try:
        with pytest.raises(HubPushError, match="rejected the token"):
            push_to_hub(small, repo_id, token="hf_wrong_token")
    finally:
        del small.config.a3_compression["note"]
    assert _snapshot(hub, repo_id) == before
    assert all(s == 401 for m, p, s in hub.log[start:] if m in ("POST", "PUT")), hub.log[start:]


# Where a push fails half-way: the store refuses the second weight shard (some shards are already up), or the
# commit call itself fails (every shard is up). (method, path regex, status, message, requests let through)
MID_UPLOAD_FAULTS = {"upload": ("PUT", r"^/upload/", 403, "Request has expired", 1),
                     "commit": ("POST", r"^/api/models/[^?]*/commit/", 503, "Service Unavailable", 0)}


def _push_failing_mid_upload(hub, pushed, where, factor):
    """Push changed weights (new bytes in every shard, so every shard is a new upload) into ``pushed``'s repo
    while ``where`` fails; returns the exception, the changed model and the successful uploads before it."""
    changed = copy.deepcopy(pushed["model"])
    with torch.no_grad():
        for layer in changed.model.layers:
            layer.mlp.down_proj.weight.mul_(factor)
    start = len(hub.log)
    fault = hub.fail(*MID_UPLOAD_FAULTS[where])
    try:
        with pytest.raises(Exception) as err:
            push_to_hub(changed, pushed["repo"], tokenizer=tiny_tokenizer(), token=hub.token, max_shard_size="60KB")
    finally:
        hub.faults.clear()
    assert fault.failed >= 1
    uploaded = [r for r in hub.log[start:] if r[0] == "PUT" and r[1].startswith("/upload/") and r[2] == 200]
    return err.value, changed, uploaded


@pytest.mark.parametrize("where", MID_UPLOAD_FAULTS)
def test_push_failing_mid_upload_publishes_nothing(hub, client, pushed, where):
    """README: a push is one commit and publishes nothing if it fails, also half-way through the upload."""
    repo_id = pushed["repo"]
    before = _snapshot(hub, repo_id)
    _, changed, uploaded = _push_failing_mid_upload(hub, pushed, where, factor={"upload": 2.0, "commit": 3.0}[where])
    assert uploaded  # it failed mid-way: some weights had reached the store
    assert _snapshot(hub, repo_id) == before  # same commits, same files: the half-upload is invisible

    info = push_to_hub(changed, repo_id, tokenizer=tiny_tokenizer(), token=hub.token, max_shard_size="60KB")
    assert hub.commit_count(repo_id) == before[0] + 1 and hub.repos[repo_id].refs["main"] == info.oid
    files = hub.files(repo_id)
    assert "model.safetensors" not in files and sum(name.endswith(".safetensors") for name in files) > 1

    # To a new repository: it is created before the upload starts and stays as created (README says so).
    fresh = f"{repo_id}-new"
    hub.fail(*MID_UPLOAD_FAULTS[where])
    try:
        with pytest.raises(Exception):
            push_to_hub(changed, fresh, tokenizer=tiny_tokenizer(), token=hub.token, max_shard_size="60KB")
    finally:
        hub.faults.clear()
    assert hub.commit_count(fresh) == 1 and set(hub.files(fresh)) == {".gitattributes"}


@pytest.mark.parametrize("where", MID_UPLOAD_FAULTS)
def test_push_failing_mid_upload_says_why_in_one_line(hub, client, pushed, where):
    error, _, _ = _push_failing_mid_upload(hub, pushed, where, factor={"upload": 5.0, "commit": 7.0}[where])
    assert isinstance(error, HubPushError), f"{type(error).__name__}: {error}"
    status = str(MID_UPLOAD_FAULTS[where][2])
    assert "\n" not in str(error) and status in str(error) and "nothing was published" in str(error)


def test_repush_replaces_stale_weights_and_keeps_a_users_card(hub, client, pushed, tmp_path):
    small, repo_id = pushed["model"], pushed["repo"]
    ckpt = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.0)).save(small, ckpt, tokenizer=tiny_tokenizer(), max_shard_size="60KB")
    assert (ckpt / "model.safetensors.index.json").is_file()
    (ckpt / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    own_name = repo_id.split("/")[1] + "-sharded"
    info = push_folder_to_hub(ckpt, own_name, token=hub.token)  # no namespace: the token's user
    assert info.repo_url.repo_id == f"a3-tester/{own_name}"
    files = hub.files(f"a3-tester/{own_name}")
    assert files["README.md"] == b"---\nlicense: mit\n---\n# My own card\n"

    # the same weights, now sharded, over the single-file push: the old model.safetensors must go
    assert "model.safetensors" in hub.files(repo_id)
    push_folder_to_hub(ckpt, repo_id, token=hub.token, commit_message="Shard the weights")
    files = hub.files(repo_id)
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert sum(name.endswith(".safetensors") for name in files) > 1
    assert CARD_MARKER not in files["README.md"].decode()  # the user's card was kept


def test_private_push_and_access_checks(hub, client, compressed, repo_id):
    info = push_to_hub(compressed["model"], repo_id, token=hub.token, private=True)
    assert hub.repos[repo_id].private and info.oid
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(repo_id)
    assert HfApi(token=hub.token).model_info(repo_id).sha == info.oid

    assert check_hub_access(repo_id, token=hub.token) == "a3-tester"
    with pytest.raises(HubPushError, match="rejected the token"):
        check_hub_access(repo_id, token="hf_wrong_token")
    with pytest.raises(HubPushError, match="invalid repo id"):
        check_hub_access("not a/valid//id", token=hub.token)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_hub_access(repo_id)
    with pytest.raises(HubPushError, match="cannot write to someone-else/x"):
        push_to_hub(compressed["model"], "someone-else/x", token=hub.token)
    assert "someone-else/x" not in hub.repos


def test_incomplete_directory_is_refused_before_any_request(hub, client, repo_id, tmp_path):
    start = len(hub.log)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="a3_compression"):
        push_folder_to_hub(tmp_path, repo_id, token=hub.token)
    with pytest.raises(CheckpointError, match="not a directory"):
        push_folder_to_hub(tmp_path / "missing", repo_id, token=hub.token)
    assert len(hub.log) == start and repo_id not in hub.repos


def test_console_script_push_through_hf_endpoint(hub, compressed, repo_id, tmp_path):
    ckpt = tmp_path / "ckpt"
    A3Compressor(A3Config(ratio=0.0)).save(compressed["model"], ckpt, tokenizer=tiny_tokenizer())
    env = client_env(hub, str(tmp_path / "home"), HF_TOKEN=hub.token)
    script = Path(sys.executable).with_name("optimum-a3")  # the installed console script
    assert script.is_file(), script
    proc = subprocess.run([str(script), "push", str(ckpt), repo_id, "--license", "apache-2.0"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["repo_id"] == repo_id and out["commit"] == hub.repos[repo_id].refs["main"]
    card = hub.files(repo_id)["README.md"].decode()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "apache-2.0"
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in card


# In a fresh process: load a quantized checkpoint by repo id the way the CLI does, compare with the reference.
LOAD_QUANTIZED = """
import json, sys, torch
from optimum_a3.checkpoint.loading import load_model_and_tokenizer
model, tokenizer = load_model_and_tokenizer(sys.argv[1])
ref = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ref["input_ids"]).logits
print(json.dumps({"logits_equal": bool(torch.equal(logits, ref["logits"])), "vocab": len(tokenizer),
                  "quantized_layers": sum(type(m).__name__ == "HQQLinear" for m in model.modules())}))
"""


def test_quantized_model_is_pushed_in_its_format_and_loads_by_repo_id(hub, client, compressed, repo_id, tmp_path):
    from optimum_a3.integrations.quantization import quantize_model

    quantized = quantize_model(copy.deepcopy(compressed["model"]), backend="hqq", bits=4)
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


def test_quantized_checkpoint_without_its_weights_is_refused(hub, client, compressed, repo_id, tmp_path):
    from optimum_a3.integrations.quantization import quantize_model, save_quantized

    directory = Path(save_quantized(quantize_model(copy.deepcopy(compressed["model"]), backend="hqq"), tmp_path / "q"))
    (directory / "qmodel.pt").unlink()
    start = len(hub.log)
    with pytest.raises(CheckpointError, match="hqq-quantized checkpoint without qmodel.pt"):
        push_folder_to_hub(directory, repo_id, token=hub.token)
    assert len(hub.log) == start and repo_id not in hub.repos
