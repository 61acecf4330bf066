"""fuse_projections: q|k|v and gate|up as one matmul give the unfused model's outputs, whatever order
the members are called in, and leave alone what they cannot fuse."""

from __future__ import annotations

import pytest
import torch

from kernels.quant_linear import QuantLinear
from slimforge import SlimforgeError
from slimforge.fused_projections import FusedProjection, ProjectionSlice, fuse_projections
from tests.helpers import ARCHS, tiny_model
from tests.test_gpu import uneven_prune, with_quant_linears


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))  # qwen2: q/k/v with biases
def test_fused_model_gives_the_unfused_logits(arch, tokenizer):
    model = tiny_model(arch, tokenizer, seed=1, layers=3)
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    assert fuse_projections(model) == 6  # 3 layers x (q|k|v, gate|up)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionSlice) and isinstance(attn.qkv_proj, FusedProjection)
    assert attn.qkv_proj.fused.weight.shape == (32 + 2 * 16, 32)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0  # already fused: nothing left to do


def test_fused_pruned_model_with_uneven_layers(tokenizer):
    model = uneven_prune(tiny_model("llama", tokenizer, seed=2))
    ids = torch.randint(0, len(tokenizer), (1, 7), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    assert fuse_projections(model) == 4
    assert model.model.layers[0].mlp.gate_up_proj.fused.out_features == 2 * 37
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_fused_quantlinear_model_matches_and_keeps_the_packed_weights(tokenizer):
    model = with_quant_linears(tiny_model("llama", tokenizer, seed=2), bits=4, rank=0)
    packed_k = model.model.layers[1].self_attn.k_proj.packed.clone()
    ids = torch.randint(0, len(tokenizer), (2, 5), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    assert fuse_projections(model) == 4
    fused = model.model.layers[1].self_attn.qkv_proj.fused
    assert isinstance(fused, QuantLinear) and fused.bits == 4 and fused.out_features == 64
    assert torch.equal(fused.packed[32:48], packed_k)  # rows concatenated as they were: q, k, v
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)


def test_layers_with_a_low_rank_correction_are_left_alone(tokenizer):
    model = with_quant_linears(tiny_model("llama", tokenizer, seed=2), bits=4, rank=2)
    assert fuse_projections(model) == 0
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    mixed = tiny_model("llama", tokenizer, seed=2)
    attn = mixed.model.layers[0].self_attn
    attn.k_proj = QuantLinear.from_linear(attn.k_proj, bits=4, group=32)
    assert fuse_projections(mixed) == 3  # layer 0's q|k|v mixes nn.Linear and QuantLinear
    assert not hasattr(attn, "qkv_proj") and hasattr(mixed.model.layers[1].self_attn, "qkv_proj")


def test_members_in_any_order_and_inputs_changed_in_place():
    layers = [torch.nn.Linear(8, n, bias=True) for n in (4, 2, 2)]
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = layers
    assert fuse_projections(parent) == 1
    x = torch.randn(3, 8)
    expect = [layer(x) for layer in layers]
    owner = parent.qkv_proj
    with torch.no_grad():
        torch.testing.assert_close(parent.v_proj(x), expect[2])
        assert owner._pending is not None  # computed once, kept for q and k
        torch.testing.assert_close(parent.k_proj(x), expect[1])
        torch.testing.assert_close(parent.k_proj(x), expect[1])  # twice: recomputes, still right
        x.mul_(2)  # in place: the kept output is stale and must not be served
        torch.testing.assert_close(parent.q_proj(x), layers[0](x))
        torch.testing.assert_close(parent.k_proj(x), layers[1](x))
        torch.testing.assert_close(parent.v_proj(x), layers[2](x))
        assert owner._pending is None  # every member read it: the output is not kept
        torch.testing.assert_close(parent.q_proj(x.clone()), layers[0](x))  # another tensor: recomputed


def test_a_name_taken_by_something_else_is_an_error():
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (torch.nn.Linear(8, 4) for _ in range(3))
    parent.qkv_proj = torch.nn.Identity()
    with pytest.raises(SlimforgeError, match="already has an attribute 'qkv_proj'"):
        fuse_projections(parent)
    assert isinstance(parent.q_proj, torch.nn.Linear)  # left as it was
