"""Compression across processes with torch.distributed (gloo, 2 processes on CPU, spawned by torchrun).

The 2-process checkpoint must match the 1-process one (same kept RoPE pairs and MLP widths; weights and
logits within float rounding: the statistics are the same float64 sums, added in another order), a
2-process run repeated must give identical files, and a rank that fails must fail the whole run, leave
the output directory as it was and leave no process behind.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_a3 import A3Compressor, A3Config
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

JOB = Path(__file__).with_name("distributed_job.py")
TIMEOUT_S = 240  # a torchrun of 2 tiny processes takes ~15 s here


def _torchrun(*args, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` of the job in its own process group, killed whole on a timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "A3_DIST_TIMEOUT_S": "120", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(JOB), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout} s")
    finally:
        _assert_no_process_left(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_no_process_left(pgid: int) -> None:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("the torchrun job left processes behind")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "src"
    tiny_llama(seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _one_process(mode: str, method: str, src: Path, out: Path) -> Path:
    torch.set_num_threads(1)
    # allocation_windows: the default's first pass takes one window per process at least (2 under torchrun here)
    compressor = A3Compressor(A3Config(ratio=0.25, method=method, nsamples=8, seqlen=32, sensitivity_tokens=16,
                                       allocation_windows=2 if method == "default" else None))
    ids = random_token_windows(8, 32, seed=1)
    if mode == "streamed":
        return Path(compressor.compress_checkpoint(src, out, calibration_ids=ids, progress=False))
    small = compressor.compress(AutoModelForCausalLM.from_pretrained(src), calibration_ids=ids, progress=False)
    return Path(compressor.save(small, out))


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _solved_layers(stdout: str) -> dict[int, list[int]]:
    """What each rank of the job printed: ``rank R solved layers [..]``."""
    found = re.findall(r"rank (\d+) solved layers \[([\d, ]*)\]", stdout)
    return {int(rank): [int(i) for i in layers.split(",") if i.strip()] for rank, layers in found}


# quality: sequential, teacher refit and the mixed allocation, whose probes (one 16-token window, which
# cannot be split) are shared between the ranks instead of the windows.
@pytest.mark.parametrize("mode,method", [("streamed", "paper"), ("memory", "paper"), ("streamed", "default"),
                                         ("memory", "default"), ("memory", "quality")])
def test_two_processes_give_the_one_process_checkpoint(source, tmp_path, mode, method):
    one = _one_process(mode, method, source, tmp_path / "one")
    run = _torchrun(mode, method, str(source), str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    two = tmp_path / "two"
    # paper (statistics of the original model): layer-parallel, each rank solves the layers it owns;
    # default (sequential calibration): every rank solves every layer, its share of the next one needs it.
    assert _solved_layers(run.stdout) == ({0: [0], 1: [1]} if method == "paper" else {0: [0, 1], 1: [0, 1]})
    probes = {int(r): int(n) for r, n in re.findall(r"rank (\d+) ran (\d+) probes", run.stdout)}
    # default and quality probe where the model is in memory (streamed, the default falls back to uniform dims)
    probing = method != "paper" and mode == "memory"
    assert probes == ({0: 3, 1: 3} if probing else {0: 0, 1: 0})  # 2 layers x 3 components, shared
    if mode == "memory":  # rank 1 received the layer it did not solve: it returned the very same model
        assert _hashes(tmp_path / "two.rank1") == _hashes(two)
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if "rope_pairs" in name:  # the kept RoPE pairs: the same selection
            assert torch.equal(a[name], b[name]), name
        else:  # float32 weights solved from float64 statistics summed in another order
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (one / "config.json").read_text() == (two / "config.json").read_text()  # same dims, same record
    ids = random_token_windows(2, 16, seed=5)
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (one, two)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["default", "paper"])
def test_two_process_runs_are_bit_identical(source, tmp_path, method):
    outputs = []
    for name in ("first", "second"):
        run = _torchrun("streamed", method, str(source), str(tmp_path / name))
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(_hashes(tmp_path / name))
    assert outputs[0] == outputs[1]


# default: both ranks solve layer 1, rank 1 fails there; paper: rank 1 owns layer 1 and fails solving it
# while rank 0 waits to receive it; default on rank 0: the writer itself fails.
@pytest.mark.parametrize("method,fail_rank", [("default", 1), ("paper", 1), ("default", 0)])
def test_a_failing_rank_fails_the_run_and_leaves_the_output_untouched(source, tmp_path, method, fail_rank):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous checkpoint")
    run = _torchrun("streamed", method, str(source), str(out), "--fail-rank", str(fail_rank))
    assert run.returncode != 0
    assert f"planted failure on rank {fail_rank}" in run.stderr  # the failing rank's own error
    # the other rank stopped instead of waiting, naming the one that failed
    assert f"rank {1 - fail_rank}: rank {fail_rank} of this 2-process run failed" in run.stderr
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "the previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial checkpoint left beside it


def test_a_stats_cache_under_torchrun_records_then_solves_layer_parallel_and_stops_on_damage(source, tmp_path):
    cache = tmp_path / "cache"
    record = _torchrun("streamed", "paper", str(source), str(tmp_path / "miss"), "--stats-cache", str(cache))
    assert record.returncode == 0, record.stderr[-3000:]
    # A miss: rank 0 records every layer's statistics, so every rank has them and solves every layer.
    assert _solved_layers(record.stdout) == {0: [0, 1], 1: [0, 1]}
    entries = list(cache.glob("a3-stats-*"))
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
    hit = _torchrun("streamed", "paper", str(source), str(tmp_path / "hit"), "--stats-cache", str(cache))
    assert hit.returncode == 0, hit.stderr[-3000:]
    # A hit: each rank reads and solves only its own layers; the very same weights (the recorded sums).
    assert _solved_layers(hit.stdout) == {0: [0], 1: [1]}
    assert _hashes(tmp_path / "hit")["model.safetensors"] == _hashes(tmp_path / "miss")["model.safetensors"]
    # Layer 1's statistics damaged: its owner (rank 1) finds out mid-way; the run stops on every rank.
    layer_file = entries[0] / "layer-00001.safetensors"
    layer_file.write_bytes(layer_file.read_bytes()[:-8] + b"\0" * 8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous checkpoint")
    damaged = _torchrun("streamed", "paper", str(source), str(out), "--stats-cache", str(cache))
    assert damaged.returncode != 0
    assert "does not match its sha256" in damaged.stderr and "run it again" in damaged.stderr
    assert "rank 0: rank 1 of this 2-process run failed" in damaged.stderr
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert not list(cache.glob("a3-stats-*"))  # the damaged entry is deleted: the next run recomputes


def test_windows_are_shared_in_contiguous_blocks_covering_each_once():
    from optimum_a3.pipeline.distributed import DistributedRunError, Ranks

    windows = torch.arange(8)[:, None]
    shares = [Ranks(rank, 3).share(windows)[:, 0].tolist() for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert Ranks().share(windows).equal(windows)
    with pytest.raises(DistributedRunError, match="use nsamples >= 3"):
        Ranks(0, 3).share(windows[:2])


def test_a_distributed_run_refuses_reused_statistics_before_any_collective(tmp_path):
    from optimum_a3.config import A3ConfigError
    from optimum_a3.pipeline.distributed import Ranks
    from optimum_a3.pipeline.loop import ResidentLayers
    from optimum_a3.pipeline.run import Calibration, run_compression
    from optimum_a3.pipeline.sinks import ModelSink

    model = tiny_llama()
    ids = random_token_windows(8, 32, seed=1)
    compressor = A3Compressor(A3Config(ratio=0.25, method="paper"))
    compressor.compress(model, calibration_ids=ids, progress=False, keep_statistics=True)
    calibration = lambda: Calibration(ids, {"dataset": "ids", "tokens": ids.numel()})  # noqa: E731
    with pytest.raises(A3ConfigError, match="reusing statistics in memory is for one process"):
        run_compression(A3Config(ratio=0.25, method="paper"), model, calibration, ResidentLayers(model.model.layers),
                        ModelSink, statistics=compressor.last_statistics, ranks=Ranks(0, 2))


def test_layers_are_owned_round_robin_and_only_when_distributed():
    from optimum_a3.pipeline.distributed import LayerOwners, Ranks

    owners = LayerOwners(Ranks(1, 3), split=True)
    assert [owners.owner(i) for i in range(5)] == [0, 1, 2, 0, 1]
    assert [i for i in range(5) if owners.solves(i)] == [1, 4]
    for every_rank in (LayerOwners(Ranks(1, 3)), LayerOwners(Ranks(), split=True)):  # not split: all layers
        assert every_rank.owner(3) is None and all(every_rank.solves(i) for i in range(5))
