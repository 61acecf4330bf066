"""The package stage on the tiny profile: deployables that stock libraries load, merged logits equal to
base + adapters, the fresh-process accuracy check, bad input, and the registry's champion rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from slimforge import SlimforgeError, registry
from slimforge.adapters import add_lora, load_adapter
from slimforge.evaluate import evaluate
from slimforge.io import write_json
from slimforge.modeling import load_model
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from slimforge.quantized import load_quantized, pack_linears, save_quantized
from slimforge.tasks.records import load_records
from stages.package.params import PackageParams
from tests.conftest import REPO
from tests.helpers import save_tiny

TEST_FILES = ("test.jsonl", "lora_test.jsonl", "rl_test.jsonl")


def _adapter(model, folder, seed):
    peft = add_lora(model, 2, 4.0, ["q_proj", "v_proj", "down_proj"], seed=seed)
    with torch.no_grad():  # non-zero B: merging changes the weights
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(folder)
    return peft


def _accuracy(model, tokenizer, suite_dir):
    tests = [r for f in TEST_FILES for r in load_records(suite_dir / f, need_answer=True)]
    with torch.no_grad():
        return evaluate(model, tokenizer, tests)["accuracy"]


@pytest.fixture()
def inputs(tmp_path, suite_dir, tokenizer):
    """What the upstream stages leave: base, lora/adapter, rl/adapter (+ merge_first.json), pruned, reports."""
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    model, _ = load_model(base)
    _adapter(model, tmp_path / "lora" / "adapter", seed=1)
    merged = load_adapter(load_model(base)[0], tmp_path / "lora" / "adapter").merge_and_unload()
    rl = _adapter(merged, tmp_path / "rl" / "adapter", seed=2)
    write_json(tmp_path / "rl" / "adapter" / "merge_first.json", {"merge_first": str(tmp_path / "lora" / "adapter")})
    plain, _ = load_model(base)
    save_pruned(prune_model(plain, PrunePlan.identity(plain.config)), tokenizer, PrunePlan.identity(plain.config),
                tmp_path / "pruned")
    reports = tmp_path / "reports"
    lora_model = load_adapter(load_model(base)[0], tmp_path / "lora" / "adapter")
    write_json(reports / "lora.json", {"results": {"recovered": {"accuracy": _accuracy(lora_model, tokenizer, suite_dir)}}})
    write_json(reports / "rl.json", {"results": {"rl": {"accuracy": _accuracy(rl, tokenizer, suite_dir)}}})
    write_json(reports / "prune.json", {"searched": {"accuracy": _accuracy(plain, tokenizer, suite_dir)}})
    quantized = pack_linears(load_model(base)[0], 4, 32, rank=2)  # RTN + a zero-init correction (up = 0)
    save_quantized(quantized, tokenizer, base, tmp_path / "quantized")
    write_json(reports / "quantize.json", {"final": "rtn", "results": {"rtn": {"accuracy": _accuracy(
        load_quantized(tmp_path / "quantized")[0], tokenizer, suite_dir)}}})
    return tmp_path


def _run(tmp_path, suite_dir, **over):
    from stages.package.stage import run

    params = PackageParams.model_validate({"name": "pkg-test", **over})
    return run(params, tmp_path / "base", tmp_path / "lora", tmp_path / "rl", tmp_path / "pruned", suite_dir,
               tmp_path / "reports", tmp_path / "package", tmp_path / "package.json", tmp_path / "package_report.json",
               quantized=tmp_path / "quantized")


def test_package_deployables_load_stock_and_register(inputs, suite_dir, tokenizer):
    m = _run(inputs, suite_dir)
    package = inputs / "package"
    assert m["deployables"] == ["adapters/correction", "adapters/lora", "adapters/rl", "compact", "full", "quantized"]
    assert set(m["test"]) == set(m["deployables"]) - {"adapters/correction"} and all(0 <= v <= 1 for v in m["test"]["full"]["accuracy"].values())
    for kind in m["deployables"]:
        card = (package / kind / "README.md").read_text()
        assert "## Test accuracy" in card and "| add3 |" in card and "bits per weight" in card
    full_config = json.loads((package / "full" / "config.json").read_text())
    assert "auto_map" not in full_config and full_config["architectures"] == ["LlamaForCausalLM"]
    assert m["sizes"]["quantized"]["bits_per_weight"] < m["sizes"]["full"]["bits_per_weight"] / 2
    assert "4-bit g32" in (package / "quantized" / "README.md").read_text()
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(package / 'full')!r})\n"
              "assert not [k for k in sys.modules if k.startswith('slimforge')]\n"
              "print(m(input_ids=torch.tensor([[1, 5, 6, 7]])).logits.flatten().tolist())")
    stock = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=inputs)
    assert stock.returncode == 0, stock.stderr[-2000:]
    # the merged model computes what base + lora (merged) + rl adapter compute
    merged = load_adapter(load_model(inputs / "base")[0], inputs / "lora" / "adapter").merge_and_unload()
    with torch.no_grad():
        want = load_adapter(merged, inputs / "rl" / "adapter")(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    got = torch.tensor(json.loads(stock.stdout.strip().splitlines()[-1]))
    assert torch.allclose(got, want.flatten(), atol=1e-4)
    reg = m["registry"]
    assert reg["name"] == "pkg-test" and reg["promoted"] and set(reg["aliases"]) == {"challenger", "champion"}
    import mlflow

    pipe = mlflow.transformers.load_model(f"models:/pkg-test@{registry.CHAMPION}")
    out = pipe("12+3=", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("12+3=")
    version = registry.describe("pkg-test")[-1]
    assert version["aliases"] == ["challenger", "champion"] and version["commit"]


def test_a_mismatch_with_the_pipeline_fails_and_writes_nothing(inputs, suite_dir):
    report = json.loads((inputs / "reports" / "rl.json").read_text())
    report["results"]["rl"]["accuracy"]["chain"] = 0.9  # what the pipeline claims; the tiny model scores ~0
    write_json(inputs / "reports" / "rl.json", report)
    with pytest.raises(SlimforgeError, match=r"do not reproduce the pipeline's accuracy: full chain: pipeline 0.900"):
        _run(inputs, suite_dir, register_model=False)
    assert not (inputs / "package").exists()


def test_bad_input_fails_before_work(inputs, suite_dir, tokenizer):
    from slimforge.config import parse_params

    with pytest.raises(SlimforgeError, match=r"max_shard_size: String should match pattern .* \(got 'big'\)"):
        parse_params({"max_shard_size": "big"}, PackageParams, "params/package.yaml")
    with pytest.raises(SlimforgeError, match=r"name: String should match pattern .* \(got 'no spaces'\)"):
        parse_params({"name": "no spaces"}, PackageParams, "params/package.yaml")
    write_json(inputs / "rl" / "adapter" / "merge_first.json", {"merge_first": "elsewhere/adapter"})
    with pytest.raises(SlimforgeError, match="was trained on the base with elsewhere/adapter merged"):
        _run(inputs, suite_dir, register_model=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.package.stage import adapter_problems

    config = LlamaConfig.from_pretrained(inputs / "base")  # an adapter of another base: other MLP widths
    config.intermediate_size *= 2
    problems = adapter_problems(inputs / "lora" / "adapter", LlamaForCausalLM(config))
    assert len(problems) == 1 and "does not fit the base's" in problems[0]
    assert adapter_problems(inputs / "lora" / "adapter", load_model(inputs / "base")[0]) == []
    assert not (inputs / "package").exists()


def test_champion_moves_only_when_beaten_and_rolls_back(tmp_path, tokenizer):
    folder = save_tiny("llama", tokenizer, tmp_path / "m")
    import mlflow

    def reg(metric, hi):
        with mlflow.start_run():
            return registry.register(folder, "champ-test", metric=metric, metric_hi=hi, tags={}, artifacts={},
                                     pip_requirements=["torch", "transformers"])

    first = reg(0.50, 0.55)
    assert first["promoted"] and first["champion_before"] is None
    tie = reg(0.54, 0.59)  # inside the champion's interval: stays challenger
    assert not tie["promoted"] and str(registry.champion("champ-test").version) == first["version"]
    better = reg(0.60, 0.65)
    assert better["promoted"] and str(registry.champion("champ-test").version) == better["version"]
    assert registry.rollback("champ-test") == first["version"]
    assert str(registry.champion("champ-test").version) == first["version"]
    registry.promote("champ-test", tie["version"])  # by hand, whatever the metric says
    assert str(registry.champion("champ-test").version) == tie["version"]
    assert registry.rollback("champ-test") == first["version"]
    with pytest.raises(SlimforgeError, match="no earlier champion"):
        registry.rollback("champ-test")
    cli = subprocess.run([sys.executable, "-m", "slimforge.cli", "registry", "show", "champ-test"], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and json.loads(cli.stdout)[-1]["version"] == better["version"]


def test_a_name_holding_other_models_is_refused(tmp_path, tokenizer):
    from mlflow import MlflowClient

    from slimforge.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    client.create_registered_model("not-ours")
    client.create_model_version("not-ours", source=str(tmp_path), run_id=None)
    with pytest.raises(SlimforgeError, match="exists and holds models that are not slimforge's"):
        registry.check_compatible("not-ours")
    registry.check_compatible("never-registered")  # a new name is fine


def test_a_model_the_export_format_cannot_hold_is_skipped_or_refused(inputs, suite_dir, tokenizer):
    """Group 64 on a 32-wide model: slimforge pads K, compressed-tensors stores whole groups only."""
    quantized = pack_linears(load_model(inputs / "base")[0], 4, 64, rank=2)
    save_quantized(quantized, tokenizer, inputs / "base", inputs / "quantized")  # replaces the fixture's g32
    with pytest.raises(SlimforgeError, match=r"q_proj: the stock layout's 32 input features are not a multiple of "
                                             r"group 64 \(compressed-tensors stores whole groups"):
        _run(inputs, suite_dir, register_model=False, quantized_export="required")
    assert not (inputs / "package").exists()
    m = _run(inputs, suite_dir, register_model=False)  # auto: the other deployables ship, the reason is recorded
    assert "quantized" not in m["deployables"] and "not a multiple of group 64" in m["compressed_tensors"]["skipped"]
    assert not (inputs / "package" / "quantized").exists() and (inputs / "package" / "full").is_dir()
