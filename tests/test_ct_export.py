"""The compressed-tensors export (slimforge/ct_export.py): the packing is the library's, the stock
loader (transformers + compressed-tensors + PEFT, in a fresh process without slimforge) computes
slimforge's logits, padding a pruned model is exact, and what cannot be exported is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from slimforge import SlimforgeError
from slimforge.ct_export import export_compressed_tensors, pack_dense
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from slimforge.quantized import load_quantized, pack_linears, save_quantized
from stages.package.check import CORRECTION, QUANTIZED
from tests.conftest import REPO
from tests.helpers import tiny_model
from tests.test_lora import _plan

compressed_tensors = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_is_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2 ** bits, (5, 70))  # K not a multiple of 32: the last word is partial
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' codes
    assert torch.equal(pack_dense(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_dense(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


def _quantized_pruned(tokenizer, folder, bits, plan=None, model=None):
    """A pruned (uneven widths) model, round-to-nearest quantized with a random low-rank correction."""
    model = model or tiny_model("llama", tokenizer)
    plan = plan or _plan(model)
    pruned = prune_model(model, plan)
    save_pruned(pruned, tokenizer, plan, folder / "pruned")
    pack_linears(pruned, bits, 32, rank=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in pruned.modules():
            if getattr(m, "up", None) is not None:
                m.up.normal_(0, 0.05)
    save_quantized(pruned, tokenizer, folder / "pruned", folder / "quantized_in")
    return folder / "quantized_in"


def export_with_reference(tokenizer, folder, bits) -> dict:
    """folder/pkg (quantized/ + adapters/correction) and folder/ref.safetensors: ids and the logits
    slimforge's own loader computes for them (what the stock loader must reproduce)."""
    source = _quantized_pruned(tokenizer, folder, bits)
    info = export_compressed_tensors(source, folder / "pkg" / QUANTIZED, folder / "pkg" / CORRECTION)
    model, _ = load_quantized(source)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(input_ids=ids).logits}, folder / "ref.safetensors")
    return info


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stock_loader_in_a_fresh_process_computes_slimforges_logits(tmp_path, tokenizer, bits):
    info = export_with_reference(tokenizer, tmp_path, bits)
    assert info["padded"] and info["formats"] == [f"{bits}-bit g32"] and info["correction_rank"] == 2
    config = json.loads((tmp_path / "pkg" / QUANTIZED / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert config["quantization_config"]["format"] == "pack-quantized"
    cmd = [sys.executable, str(REPO / "stages" / "package" / "check.py"), "--package", str(tmp_path / "pkg"),
           "--logits", str(tmp_path / "ref.safetensors"), "--tolerance", "1e-5"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_abs_logit_gap"] <= 1e-5 and result["slimforge_imported"] == []
    # the correction is load-bearing: without it the stock model is a different function
    (tmp_path / "pkg" / CORRECTION).rename(tmp_path / "correction")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and json.loads(done.stdout.strip().splitlines()[-1])["max_abs_logit_gap"] > 1e-3


def test_padding_that_would_mix_quantization_groups_is_refused(tmp_path, tokenizer):
    """16 heads of width 8, 4 KV heads: a layer keeping 3 query heads per KV head puts its head 3
    (source group 0) and heads 4-5 (source group 1) into one 32-column group of the stock layout."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    plan = PrunePlan.identity(model.config)
    plan.layers[1].q_heads = [h for h in range(16) if h % 4 != 3]
    plan.validate()
    source = _quantized_pruned(tokenizer, tmp_path, 4, plan=plan, model=model)
    with pytest.raises(SlimforgeError, match=r"layers\.1\.self_attn\.o_proj: padding to the stock layout would put two "
                                             r"quantization groups' weights in one group of 32"):
        export_compressed_tensors(source, tmp_path / "out", tmp_path / "corr")
    with pytest.raises(SlimforgeError, match="not a quantized folder"):
        from stages.package.stage import run

        run(None, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path / "o", tmp_path / "m.json",
            quantized=tmp_path / "pruned")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


if __name__ == "__main__":  # .ci/stock_env: the fixtures a bare venv (no slimforge) must reproduce
    from pathlib import Path

    from tests.conftest import small_tokenizer

    for b in (2, 3, 4):
        print(b, export_with_reference(small_tokenizer(), Path(sys.argv[1]) / f"bits{b}", b))
