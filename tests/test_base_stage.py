"""base stage: the load path on Llama (GQA), Qwen2 (qkv bias) and Mistral folders, the embedded
path on the test preset, and clear errors for a missing source."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimforge import SlimforgeError
from slimforge.config import load_params, parse_params
from stages.base.stage import run
from stages.base.params import BaseParams, ModelParams
from tests.conftest import REPO
from tests.helpers import ARCHS, save_tiny


def _base_params(preset="test"):
    data = load_params(REPO / "params" / "base.yaml", BaseParams).model_dump()
    return parse_params({**data, "preset": preset, "eval_batch_size": 32}, BaseParams, "base.yaml")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_load_path_saves_and_evaluates(arch, tokenizer, suite_dir, tmp_path):
    source = save_tiny(arch, tokenizer, tmp_path / "src")
    out = tmp_path / "base"
    metrics = run(ModelParams(source=str(source)), _base_params(), suite_dir, out,
                  tmp_path / "m.json", tmp_path / "plots", report=tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == metrics  # the report: everything measured
    headline = json.loads((tmp_path / "m.json").read_text())
    assert set(headline) == {"accuracy_base", "accuracy", "n", "ci95", "ppl", "params"} and headline["ppl"] == metrics["ppl"]
    assert "train" not in metrics and metrics["params"] > 0
    assert set(metrics["accuracy"]) >= {"add", "sub", "mul"}
    assert json.loads((out / "slimforge.json").read_text())["stage"] == "base"
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    copied = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(copied) is type(original)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert torch.equal(original(ids).logits, copied(ids).logits)


def test_embedded_path_trains_and_writes_everything(suite_dir, tmp_path):
    out = tmp_path / "base"
    metrics = run(ModelParams(), _base_params(), suite_dir, out, tmp_path / "m.json", tmp_path / "plots")
    losses = [float(l.split(",")[1]) for l in (tmp_path / "plots" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == metrics["train"]["steps"] and losses[-1] < losses[0]
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert metrics["train"]["tokens_per_s"] > 0
    assert not (tmp_path / ".checkpoints" / "base" / "state.pt").exists()  # cleared once done


def test_missing_source_is_a_clear_error(suite_dir, tmp_path):
    with pytest.raises(SlimforgeError, match="not a folder with a Hugging Face model"):
        run(ModelParams(source=str(tmp_path / "nowhere")), _base_params(), suite_dir, tmp_path / "o",
            tmp_path / "m.json", tmp_path / "p")
    with pytest.raises(SlimforgeError, match="hub id .local cache only"):
        run(ModelParams(source="nobody/no-such-model-xyz"), _base_params(), suite_dir, tmp_path / "o",
            tmp_path / "m.json", tmp_path / "p")
    assert not (tmp_path / "o").exists()
