"""The ``a3_compression`` / ``a3_quantization`` records (optimum_a3.checkpoint.records): the JSON written is unchanged,
malformed records are refused naming the field, unknown keys survive, and every reader goes through them."""

import copy
import json
from pathlib import Path

import pytest

from optimum_a3 import A3Compressor, A3Config
from optimum_a3.checkpoint.records import (COMPRESSION_KEY, QUANTIZATION_KEY, CompressionRecord, QuantizationRecord, RecordError,
                                compression_record, quantization_record, set_compression_record,
                                set_quantization_record, update_compression_record, update_quantization_record)
from tiny_models import random_token_windows, tiny_llama, tiny_tokenizer

CALIB = random_token_windows(4, 32, seed=31)
# The keys the compressor has always written, in their config.json order (sizes are added once counted).
COMPRESSION_KEYS = ["method", "paper", "library", "library_version", "base_model", "base_model_type", "ratio",
                    "preset", "allocation", "mlp_refit", "sequential", "components", "dims", "calibration",
                    "a3_config", "sizes"]
QUANTIZATION_KEYS = ["backend", "bits", "requested_group_size", "axis", "skip", "group_sizes", "dtype",
                     "library_version"]
QUANTIZATION = {"backend": "quanto", "bits": 4, "requested_group_size": None, "axis": None, "skip": ["lm_head"],
                "group_sizes": {"per-channel": 14}, "dtype": "bfloat16", "library_version": "0.2.7"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    model.config._name_or_path = "tiny-org/tiny-llama"
    compressor = A3Compressor(A3Config(ratio=0.25))
    small = compressor.compress(model, calibration_ids=CALIB, progress=False)
    out = tmp_path_factory.mktemp("records") / "ckpt"
    compressor.save(small, out, tokenizer=tiny_tokenizer())
    return small, out


def config_json(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def rewrite_config(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint ``src`` whose config.json is ``change(config)``."""
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    config = config_json(src)
    change(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# ------------------------------------------------------------------------------- the JSON written
def test_compressor_record_round_trips_to_the_same_json(saved):
    small, out = saved
    raw = config_json(out)[COMPRESSION_KEY]  # config.json sorts keys; the in-memory dict keeps its order
    assert list(small.config.a3_compression) == COMPRESSION_KEYS
    record = CompressionRecord.from_dict(small.config.a3_compression)
    assert json.dumps(record.to_dict()) == json.dumps(small.config.a3_compression)  # same keys, order, values
    assert CompressionRecord.from_dict(raw).to_dict() == raw
    assert record.extra == {} and record.method == "a3" and record.preset == "default"
    assert record.base_model == "tiny-org/tiny-llama" and record.ratio == 0.25
    assert record.sizes["total_params"][1] < record.sizes["total_params"][0]
    assert compression_record(small.config) == record  # the in-memory config holds the same record
    assert isinstance(small.config.a3_compression, dict)  # on the config it stays a plain dict


def test_optional_parts_are_written_in_order_and_only_when_set(saved):
    small, _ = saved
    config = copy.deepcopy(small.config)
    evaluation = {"source": "wikitext2", "seqlen": 32, "max_windows": 2, "ppl_dense": 10.0, "ppl_compressed": 12.0}
    update_compression_record(config, evaluation=evaluation)
    assert list(config.a3_compression)[-2:] == ["sizes", "evaluation"]
    recovery = {"method": "lora", "rank": 8, "alpha": 16, "steps": 2}
    update_compression_record(config, evaluation=None, recovery=recovery)  # what recover_with_lora does
    assert list(config.a3_compression)[-2:] == ["sizes", "recovery"]
    update_compression_record(config, evaluation={**evaluation, "ppl_dense": None, "ppl_before_recovery": 13.0})
    assert list(config.a3_compression)[-3:] == ["sizes", "recovery", "evaluation"]
    assert config.a3_compression["evaluation"]["ppl_dense"] is None  # an explicit null stays
    assert "evaluation" not in small.config.a3_compression  # records are values: the original is untouched


def test_an_older_record_round_trips_unchanged():
    # The first records had no preset/allocation/mlp_refit/sequential and no sizes: nothing is added.
    old = {"method": "a3", "paper": "arXiv:2505.12942", "library": "optimum-a3", "library_version": "0.1.0",
           "base_model": None, "base_model_type": "llama", "ratio": 0.2, "components": ["qk", "ov", "mlp"],
           "dims": {"head_dim_qk": [12, 12], "head_dim_vo": [12, 12], "intermediate_size": [80, 80]},
           "calibration": {"dataset": "wikipedia-offline", "nsamples": 4, "seqlen": 32, "tokens": 128, "seed": 0},
           "a3_config": {"ratio": 0.2}}
    record = CompressionRecord.from_dict(old)
    assert record.preset is None and record.mlp_refit is None and record.sizes is None
    assert json.dumps(record.to_dict()) == json.dumps(old)


def test_unknown_keys_from_a_newer_version_are_kept(saved):
    small, _ = saved
    raw = {**small.config.a3_compression, "license": "mit", "future": {"x": [1, 2]}}
    record = CompressionRecord.from_dict(raw)
    assert record.extra == {"license": "mit", "future": {"x": [1, 2]}}
    assert record.to_dict() == raw and list(record.to_dict())[-2:] == ["license", "future"]
    config = small.config.to_dict()
    config[COMPRESSION_KEY] = raw
    update_compression_record(config, evaluation={"source": "wikitext2", "ppl_compressed": 3.0})
    assert config[COMPRESSION_KEY]["license"] == "mit" and config[COMPRESSION_KEY]["future"] == {"x": [1, 2]}
    raw_q = {**QUANTIZATION, "packing": "v2"}
    assert QuantizationRecord.from_dict(raw_q).to_dict() == raw_q


def test_quantization_record_round_trips_and_sparse_records_parse():
    record = QuantizationRecord.from_dict(QUANTIZATION)
    assert list(record.to_dict()) == QUANTIZATION_KEYS
    assert json.dumps(record.to_dict()) == json.dumps(QUANTIZATION)  # requested_group_size/axis stay null
    with_eval = {**QUANTIZATION, "evaluation": {"source": "wikitext2", "seqlen": 32, "max_windows": 2, "ppl": 9.5}}
    assert json.dumps(QuantizationRecord.from_dict(with_eval).to_dict()) == json.dumps(with_eval)
    sparse = QuantizationRecord.from_dict({"backend": "hqq"})  # only the backend is required
    assert sparse.bits is None and sparse.evaluation is None


def test_quantize_model_writes_the_record_through_the_schema(saved):
    pytest.importorskip("hqq")
    from optimum_a3.integrations.quantization import quantize_model

    small, _ = saved
    model = tiny_llama(hidden=64, intermediate=96, head_dim=16)
    quantize_model(model, backend="hqq", bits=4)
    raw = model.config.a3_quantization
    assert list(raw) == QUANTIZATION_KEYS and raw["backend"] == "hqq" and raw["requested_group_size"] == 64
    assert quantization_record(model.config).to_dict() == raw


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(ratio="high"), "'ratio'"),
    (lambda r: r.update(components="qk"), "'components'"),
    (lambda r: r.update(mlp_refit="yes"), "'mlp_refit'"),
    (lambda r: r["dims"].update(head_dim_qk=[12, "8"]), "'dims.head_dim_qk'"),
    (lambda r: r["calibration"].update(tokens="128"), "'calibration.tokens'"),
    (lambda r: r.update(sizes={"total_params": [100]}), "'sizes.total_params'"),
    (lambda r: r.update(evaluation={"ppl_compressed": "12"}), "'evaluation.ppl_compressed'"),
    (lambda r: r.update(recovery=[1, 2]), "'recovery'"),
    (lambda r: r.pop("dims"), "'dims' is missing"),
    (lambda r: r.update(base_model=3), "'base_model'"),
])
def test_malformed_compression_record_names_the_field(saved, change, field):
    raw = copy.deepcopy(saved[0].config.a3_compression)
    change(raw)
    with pytest.raises(RecordError, match=f"malformed a3_compression record: field {field}"):
        CompressionRecord.from_dict(raw)


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(bits="4"), "'bits'"),
    (lambda r: r.update(axis=True), "'axis'"),
    (lambda r: r.update(skip="lm_head"), "'skip'"),
    (lambda r: r.update(group_sizes={"64": "14"}), "'group_sizes.64'"),
    (lambda r: r.update(evaluation={"ppl": "9"}), "'evaluation.ppl'"),
    (lambda r: r.pop("backend"), "'backend' is missing"),
])
def test_malformed_quantization_record_names_the_field(change, field):
    raw = copy.deepcopy(QUANTIZATION)
    change(raw)
    with pytest.raises(RecordError, match=f"malformed a3_quantization record: field {field}"):
        QuantizationRecord.from_dict(raw)


def test_a_record_that_is_not_an_object_is_refused():
    with pytest.raises(RecordError, match="a3_compression record: it must be a JSON object, got str"):
        compression_record({COMPRESSION_KEY: "a3"})
    with pytest.raises(RecordError, match="a3_quantization record: it must be a JSON object, got list"):
        quantization_record({QUANTIZATION_KEY: ["hqq"]})
    with pytest.raises(RecordError, match="'ratio'"):  # records built in code are checked too
        CompressionRecord(ratio="0.2", components=["qk"], dims={}, calibration={})


# --------------------------------------------------------------------------------- config helpers
def test_helpers_read_and_write_config_objects_and_dicts(saved):
    small, _ = saved
    assert compression_record({"model_type": "llama"}) is None
    assert compression_record(tiny_llama().config) is None and quantization_record(small.config) is None
    config = small.config.to_dict()
    record = compression_record(config)
    set_compression_record(config, None)
    assert COMPRESSION_KEY not in config
    set_compression_record(config, record)
    assert config[COMPRESSION_KEY] == small.config.a3_compression
    with pytest.raises(RecordError, match="no a3_quantization record to update"):
        update_quantization_record(config, evaluation={})
    set_quantization_record(config, QuantizationRecord(backend="hqq", bits=4))
    assert update_quantization_record(config, dtype="float16").bits == 4
    assert config[QUANTIZATION_KEY]["dtype"] == "float16"
    other = copy.deepcopy(small.config)
    set_quantization_record(other, QuantizationRecord.from_dict(QUANTIZATION))
    assert other.a3_quantization == QUANTIZATION


def test_remote_code_does_not_import_the_records_module():
    import optimum_a3.models.a3_llama as package

    for path in Path(package.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "records" not in text and "optimum_a3" not in text.replace("optimum-a3", ""), path


# ------------------------------------------------------------ malformed records in a checkpoint
def test_malformed_records_in_a_checkpoint_fail_clearly_everywhere(saved, tmp_path, capsys):
    from optimum_a3.cli import main
    from optimum_a3.checkpoint.hub import CheckpointError, check_checkpoint_dir
    from optimum_a3.checkpoint.model_card import render_model_card
    from optimum_a3.integrations.quantization import QuantizationError, load_quantized

    _, out = saved
    bad = rewrite_config(out, tmp_path / "bad", lambda c: c[COMPRESSION_KEY].update(ratio="a lot"))
    with pytest.raises(RecordError, match="field 'ratio' must be a number or null, got 'a lot'"):
        render_model_card(bad)
    with pytest.raises(CheckpointError, match="field 'ratio'"):
        check_checkpoint_dir(bad)
    assert main(["push", str(bad), "a3-tester/x"]) == 2
    assert "field 'ratio'" in capsys.readouterr().err

    bad_q = rewrite_config(out, tmp_path / "bad_q", lambda c: c.update({QUANTIZATION_KEY: {"backend": "hqq",
                                                                                           "bits": "four"}}))
    with pytest.raises(QuantizationError, match="field 'bits'"):
        load_quantized(bad_q)
    with pytest.raises(CheckpointError, match="field 'bits'"):
        check_checkpoint_dir(bad_q)
    assert main(["eval", str(bad_q), "--source", "wikitext2"]) == 2
    assert "field 'bits'" in capsys.readouterr().err


def test_recovery_refuses_a_malformed_record(saved):
    from optimum_a3.integrations.recovery import RecoveryError, recover_with_lora

    small, _ = saved
    model = copy.deepcopy(small)
    model.config.a3_compression = {**model.config.a3_compression, "components": "all"}
    with pytest.raises(RecoveryError, match="field 'components'"):
        recover_with_lora(model, train_ids=random_token_windows(2, 8), steps=1, seqlen=8, progress=False)
