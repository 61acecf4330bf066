"""GPU-only checks (skipped without CUDA): the CUDA-graph decode path generates exactly what eager
greedy decoding generates -- for stock models, for a pruned model (per-layer widths, a key/value
cache of different widths per layer) and for a model whose linears are QuantLinear (the low-bit
kernels inside the captured graph), also with fused projections -- and is faster."""

import pytest
import torch

from slimforge.evaluate.speed import decode_tokens_per_s, eager_decode, graph_decode
from slimforge.fused_projections import fuse_projections
from kernels.quant_linear import QuantLinear
from slimforge.pruning import LayerPlan, PrunePlan, prune_model
from tests.helpers import ARCHS, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graph_decode_matches_eager(arch, tokenizer):
    model = tiny_model(arch, tokenizer, seed=2).cuda()
    eager, _ = eager_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    graph, _ = graph_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    assert torch.equal(eager, graph)


def uneven_prune(model):
    """tiny_model pruned unevenly: layer 0 keeps one of its two key/value groups and 37 of 64 MLP
    channels (a width no kernel tile divides), layer 1 every head and 24 channels."""
    plan = PrunePlan.identity(model.config)
    plan.layers[0] = LayerPlan(q_heads=[2, 3], kv_heads=[1], channels=sorted([*range(0, 64, 2), 1, 3, 5, 7, 9]))
    plan.layers[1].channels = list(range(40, 64))
    return prune_model(model, plan)


def with_quant_linears(model, bits: int, rank: int):
    """Every decoder projection a QuantLinear (group 32, the tiny model's width); a non-zero
    low-rank correction when `rank` > 0, so the fused factor path is in the graph too. (Done here
    rather than with slimforge.quantized.pack_linears, which needs the config schemas' pydantic.)"""
    torch.manual_seed(3)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = QuantLinear.from_linear(child, bits=bits, group=32, rank=rank)
                    if rank:
                        q.up.data.normal_(0, 0.02)
                    setattr(parent, name, q)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graph_decode_matches_eager_on_a_pruned_model(arch, tokenizer):
    model = uneven_prune(tiny_model(arch, tokenizer, seed=2)).cuda()
    assert model.config.layer_num_kv_heads == [1, 2] and model.config.layer_intermediate_sizes == [37, 24]
    eager, _ = eager_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    graph, _ = graph_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    assert torch.equal(eager, graph)


@pytest.mark.parametrize("bits, rank", [(4, 0), (2, 8)])
def test_graph_decode_matches_eager_on_a_quantlinear_model(bits, rank, tokenizer):
    model = with_quant_linears(tiny_model("llama", tokenizer, seed=2), bits=bits, rank=rank).cuda()
    eager, _ = eager_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    graph, _ = graph_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    assert torch.equal(eager, graph)


@pytest.mark.parametrize("bits", [0, 4])  # 0: nn.Linear
def test_graph_decode_matches_eager_with_fused_projections(bits, tokenizer):
    model = tiny_model("llama", tokenizer, seed=2)
    model = (with_quant_linears(model, bits=bits, rank=0) if bits else model).cuda()
    ids = torch.randint(0, len(tokenizer), (3, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert fuse_projections(model) == 4
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-3, atol=1e-3)
    eager, _ = eager_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    graph, _ = graph_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    assert torch.equal(eager, graph)


def test_graph_decode_is_faster_than_eager(tokenizer):
    model = tiny_model("llama", tokenizer, layers=6).cuda()
    graph, mode = decode_tokens_per_s(model, new_tokens=64)
    eager, _ = decode_tokens_per_s(model, new_tokens=64, cuda_graph=False)
    assert mode == "cuda-graph" and graph > 1.5 * eager


@pytest.mark.parametrize("bits, group, rows, k, offset", [(4, 128, 64, 4096, 0), (2, 32, 37, 96, 1), (4, 32, 37, 96, 1)])
def test_dequantize_direct_launch_matches_triton_launch_and_reference(bits, group, rows, k, offset):
    """The compiled-kernel cache (kernels.lowbit_dequant.DIRECT_LAUNCH) keys on what triton specialises:
    row views starting 8 bytes into a 16-byte block (offset 1 at 2-bit K=96: 24-byte rows) must get
    a kernel of their own, and every launch must give the reference's W_hat."""
    import kernels.lowbit_dequant as dequant
    from kernels.lowbit_format import dequantize_groups, pack, quantize_groups, unpack

    q, s, z = quantize_groups(torch.randn(rows + offset, k), bits, group)
    packed, scale, zero = pack(q, bits).cuda()[offset:], s.cuda()[offset:], z.cuda()[offset:]
    ref = dequantize_groups(unpack(packed, bits, k), scale, zero, group)
    for dtype in (torch.float16, torch.bfloat16):
        first = dequant.dequantize(packed, scale, zero, bits, group, k, dtype)  # compiles, caches
        direct = dequant.dequantize(packed, scale, zero, bits, group, k, dtype)
        dequant.DIRECT_LAUNCH = False
        try:
            jit = dequant.dequantize(packed, scale, zero, bits, group, k, dtype)
        finally:
            dequant.DIRECT_LAUNCH = True
        assert torch.equal(first, ref.to(dtype)) and torch.equal(direct, first) and torch.equal(jit, first)


@pytest.mark.parametrize("m", [1, 64])
def test_lowbit_forward_direct_launch_matches_triton_launch(m, monkeypatch):
    """kernels.lowbit.DIRECT_LAUNCH: the cached compiled kernel gives what triton's own launch gives,
    and x starting 2 bytes off a 16-byte boundary gets a kernel of its own (triton specialises on it)."""
    from kernels import direct_launch, lowbit
    from kernels.lowbit_format import pack, quantize_groups

    monkeypatch.setenv("SLIMFORGE_LOWBIT_TUNE", "0")  # one launch per new shape, not a tuning's worth
    monkeypatch.setattr(direct_launch, "_COMPILED", {})

    q, s, z = quantize_groups(torch.randn(96, 256), 4, 128)
    packed, scale, zero = pack(q, 4).cuda(), s.cuda(), z.cuda()
    buf = torch.randn(m * 256 + 1, device="cuda", dtype=torch.float16)
    for x in (buf[: m * 256].view(m, 256), buf[1:].view(m, 256)):
        before = len(direct_launch._COMPILED)
        first = lowbit.lowbit_linear(x, packed, scale, zero, 4, 128)  # compiles (or finds) and caches
        direct = lowbit.lowbit_linear(x, packed, scale, zero, 4, 128)
        lowbit.DIRECT_LAUNCH = False
        try:
            jit = lowbit.lowbit_linear(x, packed, scale, zero, 4, 128)
        finally:
            lowbit.DIRECT_LAUNCH = True
        assert len(direct_launch._COMPILED) == before + 1
        assert torch.equal(direct, first) and torch.equal(jit, first)


def _pairs_kernel():
    import triton
    import triton.language as tl

    from kernels.lowbit_half2 import _half2_pair

    @triton.jit
    def pairs(W, Z, S, LO, HI, MASK: tl.constexpr, ASM: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        lo, hi = _half2_pair(tl.load(W + i), tl.load(Z + i), tl.load(S + i), MASK, ASM)
        tl.store(LO + i, lo)
        tl.store(HI + i, hi)
    return pairs


@pytest.mark.parametrize("mask, levels", [(0x000F000F, 16), (0x00030003, 4)])
def test_half2_dequantisation_is_bit_identical_to_the_fp32_route(mask, levels):
    """kernels.lowbit_half2._half2_pair's PTX (LOP3, sub.f16x2, mul.f16x2) against its fp32 route, over
    random words, every integer zero and scales from fp16 subnormals to overflow."""
    n = 1 << 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randint(-2**31, 2**31 - 1, (n,), device="cuda", dtype=torch.int64, generator=gen).to(torch.int32)
    z = torch.randint(0, levels, (n,), device="cuda", generator=gen).half()
    s = (torch.rand(n, device="cuda", generator=gen) * 30 - 26).exp2().half()  # 2**-26 (subnormal) .. 2**4
    s[:64] = torch.tensor([6e-8, 1e-4, 1.0, 4096.0, 60000.0, 0.0, -0.5, 2.0**-14] * 8, dtype=torch.float16)
    pairs = _pairs_kernel()
    out = {}
    for asm in (True, False):
        lo, hi = torch.empty(n, device="cuda", dtype=torch.float16), torch.empty(n, device="cuda", dtype=torch.float16)
        pairs[(n // 1024,)](w, z, s, lo, hi, MASK=mask, ASM=asm, BLOCK=1024)
        out[asm] = (lo, hi)
    q_lo = (w & (mask & 0xFFFF)).float()
    assert torch.equal(out[False][0], ((q_lo - z.float()) * s.float()).half())  # the route is the definition
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("mma", [3, 2])
def test_half2_gemm_equals_the_fp32_route_gemm_at_two_bits(mma):
    """At 2 bits HALF2 keeps the MMA order (one MMA per field, fields in order): same output bits."""
    from kernels import lowbit
    from kernels.lowbit_format import pack, quantize_groups

    q, s, z = quantize_groups(torch.randn(1037, 1024), 2, 128)
    packed, scale, zero = pack(q, 2).cuda(), s.cuda(), z.cuda()
    x = torch.randn(33, 1024, device="cuda", dtype=torch.float16)
    cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3, FIELDS=1, MMA=mma)
    y = [lowbit._forward(x, packed, scale, zero, 2, 128, None, None, None, cfg=dict(cfg, HALF2=h), kind="gemm")
         for h in (0, 1)]
    assert torch.equal(y[0], y[1])


@pytest.mark.parametrize("m, cfg", [
    (1, dict(BLOCK_N=4, BLOCK_KW=256, SPLIT_K=1, num_warps=2, num_stages=1, PREFETCH=False)),
    (1, dict(BLOCK_N=8, BLOCK_KW=128, SPLIT_K=4, num_warps=1, num_stages=1, PREFETCH=False)),
    (16, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=3, FIELDS=1, MMA=2))])
def test_fused_correction_counters_hold_over_back_to_back_launches(m, cfg):
    """The t-program counter words (t-programs done and readers arrived, zeroed in-kernel by the
    last reader) across 200 launches back to back, each on a new x, alternating a layer with
    hundreds of output tiles and one with fewer tiles than counter words: a tile that read t before
    its t-programs finished, or a launch that found a word left set, would give a stale or partial
    x @ down^T somewhere."""
    from kernels import lowbit
    from kernels.lowbit_format import pack, quantize_groups

    gen = torch.Generator().manual_seed(0)
    layers = []
    for n in (2048, 88):  # 88 rows: 11-22 output tiles, under the 32 counter words
        q, s, z = quantize_groups(torch.randn(n, 4096, generator=gen) * 0.05, 4, 128)
        layers.append((pack(q, 4).cuda(), s.cuda(), z.cuda(), (torch.randn(64, 4096, generator=gen) * 0.05).cuda().half(),
                       (torch.randn(n, 64, generator=gen) * 0.05).cuda().half()))
    xs = torch.randn(200, m, 4096, device="cuda", dtype=torch.float16)
    kind = "gemv" if m == 1 else "gemm"
    ys, plain = [], []
    for i, x in enumerate(xs):
        packed, scale, zero, down, up = layers[i % 2]
        ys.append(lowbit._forward(x, packed, scale, zero, 4, 128, down, up, None, cfg=cfg, kind=kind))
        plain.append(lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None, cfg=cfg, kind=kind))
    torch.cuda.synchronize()
    for i, (x, y, p) in enumerate(zip(xs, ys, plain)):
        _, _, _, down, up = layers[i % 2]
        lowrank = (x.float() @ down.float().t()) @ up.float().t()
        assert ((y.float() - p.float()) - lowrank).abs().max() < 2e-2 * lowrank.abs().max()
    assert all(not buf.any() for buf in lowbit._COUNTERS.values())
