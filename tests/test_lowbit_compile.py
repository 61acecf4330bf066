"""torch.compile and the low-bit layers: the custom op (kernels/lowbit_op.py) matches lowbit_linear,
and a QuantLinear model -- fused projections included -- compiles to one graph with one op node per
matmul and the eager model's logits. On the CPU the layer's kernel path is forced on (use_triton
patched) so the op path is what gets traced; the op itself then runs the reference."""

from __future__ import annotations

import pytest
import torch

import kernels.quant_linear as quant_linear
from kernels.lowbit import lowbit_linear
from kernels.lowbit_format import pack, quantize_groups
from kernels.lowbit_op import lowbit_linear_op
from slimforge.fused_projections import fuse_projections
from tests.helpers import tiny_model
from tests.test_gpu import with_quant_linears


@pytest.mark.parametrize("rank, with_bias", [(0, False), (4, True)])
def test_op_matches_lowbit_linear(rank, with_bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    q, scale, zero = quantize_groups(w, 4, 32)
    x = torch.randn(2, 3, 64, generator=gen)
    down = torch.randn(rank, 64, generator=gen) if rank else None
    up = torch.randn(48, rank, generator=gen) if rank else None
    bias = torch.randn(48, generator=gen) if with_bias else None
    args = (x, pack(q, 4), scale, zero, 4, 32)
    expect = lowbit_linear(*args, None, down, up, bias)
    assert torch.equal(torch.ops.slimforge.lowbit_linear(*args, down, up, bias), expect)
    compiled = torch.compile(lambda x: lowbit_linear_op(x, *args[1:], down, up, bias), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), expect)


def _op_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(node.target is torch.ops.slimforge.lowbit_linear.default for node in gm.graph.nodes)


@pytest.mark.parametrize("fuse", [False, True])
def test_quantlinear_model_compiles_to_one_graph(fuse, tokenizer, monkeypatch):
    monkeypatch.setattr(quant_linear, "use_triton", lambda t: True)  # the kernel path, on the CPU
    model = with_quant_linears(tiny_model("llama", tokenizer, seed=2), bits=4, rank=0)
    if fuse:
        assert fuse_projections(model) == 4
    ids = torch.randint(0, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        logits = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(logits, expect, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1  # fullgraph: no break at any layer
    assert _op_nodes(graphs[0]) == (4 if fuse else 7) * 2  # one node per matmul: q|k|v, o, gate|up, down


def test_compiled_training_still_gets_gradients(monkeypatch):
    monkeypatch.setattr(quant_linear, "use_triton", lambda t: True)
    torch.manual_seed(0)
    layer = quant_linear.QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group=32, rank=4)
    layer.up.data.normal_(0, 0.1)
    x = torch.randn(3, 64)
    layer(x).square().sum().backward()
    expect = layer.down.grad.clone()
    layer.down.grad = None
    torch._dynamo.reset()
    torch.compile(layer, backend="aot_eager")(x).square().sum().backward()  # grads needed: not the op
    torch.testing.assert_close(layer.down.grad, expect)
