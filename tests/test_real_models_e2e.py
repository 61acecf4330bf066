"""Real Hugging Face folders through every stage with `dvc repro`, as a user switching from the
embedded model would: Llama-3-style GQA (8 query / 2 KV heads, saved in bf16), and Qwen2 (q/k/v
biases) with tied embeddings and plain multi-head attention, both with a small byte-level BPE
tokenizer whose judge verdicts are several tokens; and a user's own task family (user_data/,
through the data stage's user_files) as the lora stage's headline.

Two folders cover the variations each stage branches on (GQA vs MHA, tied vs untied, biases,
bf16 vs fp32) at ~2 minutes each. Mistral's modules and shapes are Llama's (its sliding window
never triggers at these lengths); its pruning surgery and stock reload are tested in
tests/test_pruning_surgery.py."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from slimforge.tasks.judge import VERDICTS, verdict_ids
from slimforge.tasks.suite import build_suite
from slimforge.tokenizer import build_tokenizer
from tests.helpers import copy_source_tree, git_commit_all, tiny_model
from tests.test_pipeline_e2e import TINY, write_params

# (name, arch, query heads, KV heads, tied embeddings, dtype)
MODELS = [("llama-gqa", "llama", 8, 2, False, "bfloat16"), ("qwen2-bias-tied-mha", "qwen2", 4, 4, True, "float32")]
USER_FAMILY = "rev"  # "37>" -> "73": nothing in the embedded suite


def _user_rows(n: int, offset: int) -> str:
    rows = [{"prompt": f"{a}{b}>", "response": f"{b}{a}", "answer": f"{b}{a}", "family": USER_FAMILY}
            for a, b in ((1 + (i + offset) % 9, (3 * i + offset) % 10) for i in range(n))]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on arithmetic text only: ' yes', ' no', ' A', ' B' stay split."""
    files, _ = build_suite(seed=0, n_train={"add": 300, "sub": 300, "mul": 300}, n_val=5, n_test=5,
                           n_judge_train=0, n_judge_test=0, n_lora=(5, 5, 5), n_rl=(5, 5, 5), noisy_families=("add3",),
                           n_noisy=5, wrong_fraction=0.3, n_references=4)
    tok = build_tokenizer([r["prompt"] + r["response"] for r in files["train.jsonl"]], 280)
    for fmt in VERDICTS:
        with pytest.raises(ValueError):
            verdict_ids(tok, fmt)  # the multi-token verdict path is what this test exercises
    return tok


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    dst = copy_source_tree(tmp_path_factory.mktemp("real"))
    (dst / "user_data").mkdir(exist_ok=True)
    (dst / "user_data" / "rev_train.jsonl").write_text(_user_rows(40, 0))
    (dst / "user_data" / "rev_test.jsonl").write_text(_user_rows(12, 5))
    write_params(dst, {**TINY, "data": {**TINY["data"], "user_files": {
        "lora_train.jsonl": "user_data/rev_train.jsonl", "lora_test.jsonl": "user_data/rev_test.jsonl"}}})
    git_commit_all(dst, "tiny profile, a user family")
    return dst


def _dtype_of(folder) -> set[str]:
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("name,arch,heads,kv_heads,tie,dtype", MODELS, ids=[m[0] for m in MODELS])
def test_every_stage_runs_on_a_real_model_folder(clone, tokenizer, tmp_path, name, arch, heads, kv_heads, tie, dtype):
    source = tmp_path / name
    model = tiny_model(arch, tokenizer, seed=1, heads=heads, kv_heads=kv_heads, tie=tie).to(getattr(torch, dtype))
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    write_params(clone, {"model": {"source": str(source), "dtype": dtype}})
    run = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("base", "prune", "quantize", "filter", "lora", "rl"):
        assert f"Running stage '{stage}'" in run.stdout, stage
    assert (clone / "plots/base/loss.png").exists()  # declared for a loaded model too
    lora = json.loads((clone / "reports/lora.json").read_text())
    assert lora["families"] == [USER_FAMILY]
    recovered = lora["results"]["recovered"]
    assert recovered["accuracy_lora"] == recovered["accuracy"][USER_FAMILY]
    filtered = json.loads((clone / "reports/filter.json").read_text())
    kept = (clone / "data/filtered/filtered.jsonl").read_text().splitlines()
    assert filtered["kept_fraction"] == len(kept) / filtered["targets"] and "meta_ranking" in filtered["detection"]
    stored = "BF16" if dtype == "bfloat16" else "F32"
    assert _dtype_of(clone / "data/base") == {stored} and _dtype_of(clone / "data/pruned") == {stored}
    from slimforge.modeling import load_model

    quantized, _ = load_model(clone / "data/quantized")  # packed weights; the rest keeps its dtype
    assert quantized.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(clone / 'data/pruned')!r}, trust_remote_code=True)\n"
              "assert 'slimforge' not in sys.modules\n"
              "print(m.dtype, m(input_ids=torch.tensor([[1, 5, 6]])).logits.shape[-1])\n")
    stock = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert stock.returncode == 0, stock.stderr[-2000:]
    assert stock.stdout.split() == [f"torch.{dtype}", str(len(tokenizer))]
