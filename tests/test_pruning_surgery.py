"""Surgery on tiny Llama (GQA), Qwen2 (q/k/v biases) and Mistral: shapes, smaller on disk,
0%-identity, both GQA pruning shapes, plan checks, and a reload in a Python without slimforge."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config

from slimforge import SlimforgeError
from slimforge.io import folder_bytes
from slimforge.pruning import LayerPlan, PrunePlan, is_slimforge_pruned, prune_model, save_pruned
from tests.helpers import ARCHS, tiny_model

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def _plan(model, shape: str) -> PrunePlan:
    """Layer 0: prune a whole KV group ('group') or one query head per group ('query'); layer 1:
    half the MLP channels."""
    plan = PrunePlan.identity(model.config)
    if shape == "group":
        plan.layers[0] = LayerPlan(q_heads=[2, 3], kv_heads=[1], channels=plan.layers[0].channels)
    else:
        plan.layers[0] = LayerPlan(q_heads=[0, 3], kv_heads=[0, 1], channels=plan.layers[0].channels)
    plan.layers[1].channels = list(range(0, 64, 2))
    return plan


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_zero_sparsity_is_identity(arch, tokenizer):
    model = tiny_model(arch, tokenizer)
    pruned = prune_model(model, PrunePlan.identity(model.config))
    assert torch.equal(model(IDS).logits, pruned(IDS).logits)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("shape", ["group", "query"])
def test_cut_shapes_and_exact_submodel(arch, shape, tokenizer, tmp_path):
    model = tiny_model(arch, tokenizer)
    plan = _plan(model, shape)
    pruned = prune_model(model, plan)
    a0, m1 = pruned.model.layers[0].self_attn, pruned.model.layers[1].mlp
    assert a0.q_proj.weight.shape == (2 * 8, 32) and a0.o_proj.weight.shape == (32, 2 * 8)
    kv = 1 if shape == "group" else 2
    assert a0.k_proj.weight.shape == (kv * 8, 32) and a0.num_key_value_groups == 2 // kv
    assert m1.gate_proj.weight.shape == (32, 32) and m1.down_proj.weight.shape == (32, 32)
    if arch == "qwen2":
        assert a0.q_proj.bias.shape == (16,) and a0.k_proj.bias.shape == (kv * 8,)
    # the cut model equals the full model with the removed heads/channels' outputs zeroed
    masked = tiny_model(arch, tokenizer)
    with torch.no_grad():
        o = masked.model.layers[0].self_attn.o_proj.weight
        keep = torch.zeros(32, dtype=torch.bool)
        for h in plan.layers[0].q_heads:
            keep[h * 8:(h + 1) * 8] = True
        o[:, ~keep] = 0
        masked.model.layers[1].mlp.down_proj.weight[:, 1::2] = 0
    assert torch.allclose(masked(IDS).logits, pruned(IDS).logits, atol=1e-5)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    model.save_pretrained(full_dir)
    save_pruned(pruned, tokenizer, plan, cut_dir)
    assert (cut_dir / "model.safetensors").stat().st_size < (full_dir / "model.safetensors").stat().st_size
    assert folder_bytes(cut_dir) > 0
    assert PrunePlan.load(cut_dir / "plan.json") == plan and is_slimforge_pruned(cut_dir)


BLOCKER = """
import sys, importlib.abc
# no slimforge: drop the editable-install finder and the repo from the path, and refuse the names
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                 and "editable" not in getattr(f, "__name__", "").lower()]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("slimforge", "stages", "flows"):
            raise ImportError("slimforge is not available here")
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", ".") and "work/main" not in p]
import json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])
try:
    import slimforge  # noqa
    raise SystemExit("slimforge was importable")
except ImportError:
    pass
print(json.dumps({"cls": type(m).__name__, "logits": m(ids).logits[0, -1].tolist()}))
"""


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_folder_reloads_with_stock_transformers_without_slimforge(arch, tokenizer, tmp_path):
    model = tiny_model(arch, tokenizer)
    pruned = prune_model(model, _plan(model, "group"))
    save_pruned(pruned, tokenizer, _plan(model, "group"), tmp_path)
    proc = subprocess.run([sys.executable, "-c", BLOCKER, str(tmp_path)], capture_output=True, text=True,
                          cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"].startswith("Pruned")
    assert torch.allclose(torch.tensor(out["logits"]), pruned(IDS).logits[0, -1], atol=1e-5)


def test_plan_errors(tokenizer):
    model = tiny_model("llama", tokenizer)
    plan = PrunePlan.identity(model.config)
    plan.layers[1].kv_heads, plan.layers[1].q_heads = [], []
    with pytest.raises(SlimforgeError, match="removes every head"):
        prune_model(model, plan)
    plan = PrunePlan.identity(model.config)
    plan.layers[0].q_heads = [0, 1, 2]  # KV head 1 would serve one query head, KV head 0 two
    with pytest.raises(SlimforgeError, match="same number of kept query heads"):
        prune_model(model, plan)
    other = tiny_model("llama", tokenizer, layers=3)
    with pytest.raises(SlimforgeError, match="does not match the model"):
        prune_model(other, PrunePlan.identity(model.config))
    with pytest.raises(SlimforgeError, match="cannot prune architecture 'gpt2' .supported: llama, qwen2, mistral"):
        PrunePlan.identity(GPT2Config())
