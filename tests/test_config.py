"""Params validation: every shipped file validates; bad keys fail with a message naming them."""

from pathlib import Path

import pytest

from slimforge import SlimforgeError
from slimforge.config import load_params, parse_params
from flows.sweep_params import SweepParams
from stages.base.params import BaseParams, ModelParams
from stages.check_params import SCHEMAS
from stages.data.params import DataParams
from stages.lora.params import LoraParams
from stages.prune.params import PruneParams
from tests.conftest import REPO

SHIPPED = {Path(f).name: schema for f, schema in SCHEMAS.items()} | {"sweep.yaml": SweepParams}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_params_validate(name):
    load_params(REPO / "params" / name, SHIPPED[name])


def test_every_stage_params_file_has_a_schema():
    assert {p.name for p in (REPO / "params").glob("*.yaml")} == set(SHIPPED)


def test_unknown_key_names_it_and_allowed_keys():
    with pytest.raises(SlimforgeError) as err:
        parse_params({"seed": 1, "judge_trian": 5}, DataParams, "params/data.yaml")
    msg = str(err.value)
    assert msg.startswith("params/data.yaml: unknown key 'judge_trian'")
    assert "judge_train" in msg and "references" in msg and "\n" not in msg


def test_nested_unknown_key_and_bad_value_in_one_message():
    with pytest.raises(SlimforgeError) as err:
        parse_params({"lora": {"tain": 3}, "references": 0}, DataParams, "d.yaml")
    msg = str(err.value)
    assert "unknown key 'lora.tain' (allowed: test, train, val)" in msg
    assert "references: Input should be greater than or equal to 2" in msg


def test_preset_must_exist_and_shapes_must_divide():
    base = load_params(REPO / "params" / "base.yaml", BaseParams).model_dump()
    with pytest.raises(SlimforgeError, match="preset 'tpu' is not defined"):
        parse_params({**base, "preset": "tpu"}, BaseParams, "b.yaml")
    base["presets"]["cpu"]["num_kv_heads"] = 3
    with pytest.raises(SlimforgeError, match="num_heads by num_kv_heads"):
        parse_params(base, BaseParams, "b.yaml")


def test_unknown_family_and_user_file_names():
    with pytest.raises(SlimforgeError, match="allowed: add, sub, mul, add3, chain"):
        parse_params({"noisy": {"families": ["div"]}}, DataParams, "d.yaml")
    with pytest.raises(SlimforgeError, match="unknown suite file"):
        parse_params({"user_files": {"mine.jsonl": "x"}}, DataParams, "d.yaml")


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(SlimforgeError, match="not found"):
        load_params(tmp_path / "nope.yaml", ModelParams)
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(SlimforgeError, match="not valid YAML"):
        load_params(bad, ModelParams)
    bad.write_text("dtype: float64\n")
    with pytest.raises(SlimforgeError, match="dtype"):
        load_params(bad, ModelParams)


def test_strict_types_and_empty_files(tmp_path: Path):
    with pytest.raises(SlimforgeError, match=r"refit: Input should be a valid boolean \(got 'yes'\)"):
        parse_params({"refit": "yes"}, PruneParams, "p.yaml")
    with pytest.raises(SlimforgeError, match=r"calibration.samples: Input should be a valid integer \(got '64'\)"):
        parse_params({"calibration": {"samples": "64"}}, PruneParams, "p.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(SlimforgeError, match="empty.yaml: the file is empty"):
        load_params(empty, PruneParams)
    lr = tmp_path / "lr.yaml"
    lr.write_text("train: {lr: 1e-3, steps: 10}\n")  # YAML 1.1 would read 1e-3 as a string
    assert load_params(lr, LoraParams).train.lr == 1e-3


def test_user_files_must_live_under_user_data():
    for path in ("/tmp/mine.jsonl", "data/mine.jsonl", "user_data/../mine.jsonl"):
        with pytest.raises(SlimforgeError, match="user files must lie under user_data/"):
            parse_params({"user_files": {"test.jsonl": path}}, DataParams, "d.yaml")
    ok = parse_params({"user_files": {"test.jsonl": "user_data/mine.jsonl"}}, DataParams, "d.yaml")
    assert ok.user_files == {"test.jsonl": "user_data/mine.jsonl"}
