"""Low-bit matmul: packing round trips and layout, the Triton kernels against the PyTorch reference
(on CPU under the Triton interpreter, on a GPU when there is one), QuantLinear, and input checks."""


import pytest
import torch
from torch import nn

from kernels.lowbit import lowbit_linear
from kernels.quant_linear import QuantLinear
from kernels.lowbit_format import (fake_quantize, pack, packed_words, quantize_groups, storage_bits_per_weight,
                                   unpack)
from kernels.reference import lowbit_matmul_ref
from tests.conftest import REPO
from tests.helpers import run_cases_under_interpreter


def test_triton_matches_reference_under_interpreter():
    proc = run_cases_under_interpreter("tests.lowbit_cases", REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_checkpointing_reuses_the_recomputed_weight_and_keeps_gradients_under_interpreter():
    proc = run_cases_under_interpreter("tests.lowbit_ckpt_case", REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_matches_reference_on_gpu(monkeypatch):
    from tests.lowbit_cases import cases

    monkeypatch.setenv("SLIMFORGE_LOWBIT_TUNE", "0")
    assert cases("cuda") == []


def test_fused_low_rank_configs_are_tuned_apart_and_fall_back_to_the_plain_entry(monkeypatch):
    from kernels import lowbit_tune

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(lowbit_tune, "_sm_count", lambda device: 132)
    plain, fused = dict(BLOCK_N=4, BLOCK_KW=128, SPLIT_K=1, num_warps=1), dict(BLOCK_N=8, BLOCK_KW=256, SPLIT_K=1, num_warps=2)
    key = lowbit_tune.config_key("gemv", 1, 4096, 4096, 4, 128)
    table = {key: plain, key + "|lr": fused}
    monkeypatch.setattr(lowbit_tune, "_TABLES", {"Test GPU": table})
    cuda = torch.device("cuda")  # only its type is read here
    pick = lambda variant: lowbit_tune.config_for("gemv", 1, 4096, 4096, 4, 128, cuda, None, variant)  # noqa: E731
    assert pick("|lr") == fused and pick("") == plain
    del table[key + "|lr"]
    monkeypatch.setenv("SLIMFORGE_LOWBIT_TUNE", "0")
    assert pick("|lr") == plain  # cannot tune: the plain kernel's entry
    monkeypatch.setenv("SLIMFORGE_LOWBIT_TUNE", "1")
    tuned = []
    monkeypatch.setattr(lowbit_tune, "tune", lambda candidates, launch: tuned.append(candidates) or candidates[1])
    monkeypatch.setattr(lowbit_tune, "_remember", lambda gpu, k, cfg: table.__setitem__(k, cfg))
    got = pick("|lr")
    assert got == tuned[0][1] and table[key + "|lr"] == got and table[key] == plain
    # every GEMV launch shape is tried with and without the hand prefetch
    assert {c["PREFETCH"] for c in tuned[0]} == {True, False} and len(tuned[0]) == 24
    # bf16 GEMMs (the fp32 dequantisation route) have entries of their own, falling back to the nearest
    bf16, bf16_lr = dict(plain, num_warps=4), dict(fused, num_warps=8)
    table[key + "|bf16"], table[key + "|lr|bf16"] = bf16, bf16_lr
    assert (pick("|bf16"), pick("|lr|bf16"), pick(""), pick("|lr")) == (bf16, bf16_lr, plain, got)
    monkeypatch.setenv("SLIMFORGE_LOWBIT_TUNE", "0")
    del table[key + "|lr|bf16"]
    assert pick("|lr|bf16") == got  # key|lr before the plain key
    del table[key + "|lr"]
    assert pick("|lr|bf16") == plain


def test_mma_v2_compiles_with_wgmma_disabled_and_leaves_the_environment_as_it_was(monkeypatch):
    import os

    from kernels import lowbit, lowbit_tune
    seen = []

    names = lowbit._gemm_kernel.arg_names

    class Kernel:  # records the variable as triton would read it while compiling
        arg_names = names

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((a[names.index("MMA")], os.environ.get("DISABLE_MMA_V3")))

    monkeypatch.setattr(lowbit, "_gemm_kernel", Kernel())
    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    x, packed = torch.zeros(16, 128, dtype=torch.float16), torch.zeros(8, 16, dtype=torch.int32)
    scale, zero = torch.ones(8, 1, dtype=torch.float16), torch.zeros(8, 1, dtype=torch.float16)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3, FIELDS=1)
    for mma in (2, 3):
        lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None, cfg=dict(cfg, MMA=mma), kind="gemm")
    lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None, cfg=cfg, kind="gemm")  # no key: wgmma
    assert seen == [(2, "1"), (3, None), (3, None)] and "DISABLE_MMA_V3" not in os.environ
    monkeypatch.setenv("DISABLE_MMA_V3", "0")  # a user's own setting survives
    lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None, cfg=dict(cfg, MMA=2), kind="gemm")
    assert seen[-1] == (2, "1") and os.environ["DISABLE_MMA_V3"] == "0"
    # the tuner offers every per-field tile with both instructions
    fields = [c for c in lowbit_tune._gemm_candidates(16, 4096, 4096, 2, 132, 128) if c.get("FIELDS")]
    assert fields and {c["MMA"] for c in fields} == {2, 3}
    assert len({tuple(sorted((k, v) for k, v in c.items() if k != "MMA")) for c in fields}) * 2 == len(fields)


def test_un_swapped_gemm_is_offered_from_m17_at_half_to_four_programs_per_sm():
    from kernels import lowbit_tune

    assert not [c for c in lowbit_tune._gemm_candidates(16, 4096, 4096, 4, 132, 128) if c.get("NT")]
    nt = [c for c in lowbit_tune._gemm_candidates(64, 4096, 4096, 4, 132, 128) if c.get("NT")]
    assert len(nt) == 40 and {c["num_stages"] for c in nt} == {2, 3, 4, 5}
    for c in nt:  # 0.5-4 programs per SM, at least two K tiles per split
        assert 66 <= 4096 // c["BLOCK_N"] * c["SPLIT_K"] <= 4 * 132 and 4096 / c["SPLIT_K"] >= 2 * c["BLOCK_K"]
    assert all(c["BLOCK_K"] <= 128 for c in nt[16:])  # the extra stages go to tiles inside one group (half2)
    assert dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=5, NT=1) in nt  # H200's pick
    small = [c for c in lowbit_tune._gemm_candidates(64, 1024, 4096, 4, 132, 128) if c.get("NT")]
    assert dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=5, NT=1) in small  # 128 programs


def test_fused_correction_refuses_a_launch_its_counter_words_cannot_count():
    """A counter word counts readers in 16 bits (kernels/lowbit_triton.py _epilogue): more than
    32 * 65535 output tiles would carry into the t-programs' count and read t too early."""
    from kernels import lowbit

    cfg = dict(BLOCK_N=4, BLOCK_KW=64, SPLIT_K=1, num_warps=1, num_stages=1)
    args = (1, 8_400_000, 256)  # M, N, K: 2.1M output tiles of 4 rows
    with pytest.raises(ValueError, match="exceed the counter word"):
        lowbit._plan(cfg, "gemv", *args, 64, 4, 128, False, torch.float16, torch.device("cpu"), 256, 32)
    lowbit._plan(cfg, "gemv", *args, 0, 4, 128, False, torch.float16, torch.device("cpu"), 256, 32)  # no correction: no counters


def test_launch_plans_are_reused_per_call_shape_and_rebuilt_when_the_config_changes(monkeypatch):
    from kernels import direct_launch, lowbit, lowbit_tune

    launches = []
    monkeypatch.setattr(direct_launch, "launch", lambda kernel, grid, args, device, **kw: launches.append(
        (kernel, grid, args, kw["n_tensors"])))
    monkeypatch.setattr(lowbit, "_PLANS", {})
    x, packed = torch.randn(20, 256, dtype=torch.float16), torch.zeros(8, 32, dtype=torch.int32)
    scale, zero = torch.ones(8, 2, dtype=torch.float16), torch.zeros(8, 2, dtype=torch.float16)
    lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None)
    plan = next(iter(lowbit._PLANS.values()))
    lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None)
    (k0, g0, a0, _), (k1, g1, a1, _) = launches
    assert len(lowbit._PLANS) == 1 and next(iter(lowbit._PLANS.values())) is plan and k0 is k1 and g0 == g1 and a0[13:] == a1[13:]
    kernel, grid, args, n = launches[-1]
    named = dict(zip(kernel.arg_names, args))
    assert n == 13 and named["X"] is x and (named["M"], named["N"], named["K"]) == (20, 8, 256)
    assert named["BLOCK_N"] == lowbit_tune.config_for("gemm", 20, 8, 256, 4, 128, x.device, None)["BLOCK_N"]
    monkeypatch.setitem(lowbit_tune.OVERRIDE, "gemm", dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2,
                                                           num_warps=4, num_stages=1, NT=1))
    lowbit._forward(x, packed, scale, zero, 4, 128, None, None, None)
    named = dict(zip(launches[-1][0].arg_names, launches[-1][2]))
    assert (named["BLOCK_N"], named["SPLIT_K"], named["NT"]) == (64, 2, 1) and len(lowbit._PLANS) == 1
    assert named["WS"].shape == (2, 20, 8)  # split-K workspace per call, from the new plan


def test_dispatch_follows_the_measured_crossovers(monkeypatch):
    from kernels import lowbit
    from kernels.lowbit import GEMV_MAX_M, kernel_kind
    cpu = torch.device("cpu")
    assert kernel_kind(1, 4, cpu) == kernel_kind(GEMV_MAX_M, 2, cpu) == "gemv"
    assert [kernel_kind(m, 4, cpu) for m in (127, 128)] == ["gemm", "dequant"]  # the default crossover
    assert [kernel_kind(m, 2, cpu) for m in (127, 128)] == ["gemm", "dequant"]
    assert kernel_kind(4096, 3, cpu) == "gemm"  # no 3-bit dequantise kernel
    # a GPU with a crossover of its own (the H200: NT up to M = 128), and one without
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: {0: "NVIDIA H200", 1: "Some GPU"}[index])
    lowbit._dequant_min_m.cache_clear()
    try:
        assert [kernel_kind(m, 4, torch.device("cuda", 0)) for m in (128, 129)] == ["gemm", "dequant"]
        assert [kernel_kind(m, 2, torch.device("cuda", 1)) for m in (127, 128)] == ["gemm", "dequant"]
        # bf16 (no half2 dequantisation) keeps the default crossover
        assert [kernel_kind(m, 4, torch.device("cuda", 0), torch.bfloat16) for m in (127, 128)] == ["gemm", "dequant"]
    finally:
        lowbit._dequant_min_m.cache_clear()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("k", [32, 96, 256])
def test_pack_unpack_round_trip(bits, n, k):
    gen = torch.Generator().manual_seed(bits * n + k)
    q = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
    q[0, :5] = 2 ** bits - 1  # top bit set in some words: the int32 words go negative
    packed = pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (n, packed_words(bits, k)) == (n, k * bits // 32)
    assert torch.equal(unpack(packed, bits, k), q)


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_layout_is_the_documented_one(bits):
    units = bits  # words per unit of 32 weights
    for k in (0, 1, 5, 31, 37, 63):
        q = torch.zeros(1, 64, dtype=torch.uint8)
        q[0, k] = 1
        u, r = divmod(k, 32)
        i, j = divmod(r, units)
        words = pack(q, bits)[0]
        assert words.nonzero().flatten().tolist() == [units * u + j] and int(words[units * u + j]) == 1 << (i * bits)


def test_packed_layout_3bit_planes():
    for k in (0, 1, 6, 33, 63):
        q = torch.zeros(1, 64, dtype=torch.uint8)
        q[0, k] = 7
        u, r = divmod(k, 32)
        i, j = divmod(r, 2)
        words = [w & 0xFFFFFFFF for w in pack(q, 3)[0].tolist()]  # unsigned view
        expected = [0] * 6
        expected[2 * u + j] = 3 << (2 * i)  # low plane: as 2-bit
        expected[4 + u] = 1 << (16 * j + i)  # high plane after K/16 = 4 low words
        assert words == expected


def test_storage_bits_per_weight():
    assert storage_bits_per_weight(4, 128) == 4.25
    assert storage_bits_per_weight(3, 128) == 3.25  # two planes, no padding
    assert storage_bits_per_weight(2, 64) == 2.5
    assert storage_bits_per_weight(2, 32) == 3.0


def test_reference_is_dequantize_then_fp32_matmul():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 128, generator=gen), torch.randn(2, 5, 128, generator=gen)
    down, up, bias = torch.randn(4, 128, generator=gen), torch.randn(24, 4, generator=gen), torch.randn(24, generator=gen)
    q, s, z = quantize_groups(w, 4, 64)
    got = lowbit_matmul_ref(x, pack(q, 4), s, z, 4, 64, down, up, bias)
    expected = x @ fake_quantize(w, 4, 64).t() + (x @ down.t()) @ up.t() + bias
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_quantlinear_from_linear_cpu():
    torch.manual_seed(0)
    linear = nn.Linear(256, 40)
    layer = QuantLinear.from_linear(linear, bits=3, group=64, rank=8)
    assert (layer.in_features, layer.out_features, layer.bits, layer.group) == (256, 40, 3, 64)
    assert set(dict(layer.named_buffers())) == {"packed", "scale", "zero", "bias"}
    assert {n for n, _ in layer.named_parameters()} == {"down", "up"}
    w_hat = layer.dequantized_weight()
    assert torch.equal(w_hat, fake_quantize(linear.weight, 3, 64))
    x = torch.randn(3, 7, 256, requires_grad=True)
    y = layer(x)  # up starts at zero: the layer starts as the quantized linear
    assert torch.allclose(y, x @ w_hat.t() + linear.bias, atol=1e-4)
    with torch.no_grad():
        layer.up.normal_()
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.down.grad is not None and layer.up.grad is not None
    assert layer.packed.grad is None


def test_cpu_path_keeps_w_hat_bit_identical_and_rebuilds_it_when_the_weights_change():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 48), bits=3, group=32, rank=4)
    with torch.no_grad():
        layer.up.normal_()
    x = torch.randn(5, 64)
    ref = lambda: lowbit_matmul_ref(x, layer.packed, layer.scale, layer.zero, 3, 32, layer.down, layer.up,  # noqa: E731
                                    layer.bias)
    assert torch.equal(layer(x), ref())
    kept = layer._dense
    assert layer(x) is not None and layer._dense is kept  # no dequantisation on the next call
    with torch.no_grad():
        layer.scale.mul_(2)  # in place: the kept W_hat is stale
    assert torch.equal(layer(x), ref()) and layer._dense is not kept
    assert "_dense" not in str(list(layer.state_dict()))  # the packed form stays the only one saved


def test_cpu_inference_folds_the_correction_into_one_weight_and_refolds_after_edits():
    torch.manual_seed(1)
    layer = QuantLinear.from_linear(nn.Linear(40, 24), bits=4, group=32, rank=3)  # padded width 64
    with torch.no_grad():
        layer.up.normal_()
        x = torch.randn(5, 40)
        ref = lambda: lowbit_matmul_ref(nn.functional.pad(x, (0, 24)), layer.packed, layer.scale, layer.zero, 4, 32,  # noqa: E731
                                        layer.down, layer.up, layer.bias)
        assert torch.allclose(layer(x), ref(), atol=1e-5)
        assert layer._dense.shape == (24, 40)  # W_hat + up @ down, padded columns dropped: one matmul
        kept = layer._dense
        layer(x)
        assert layer._dense is kept
        layer.up.mul_(-1)  # an in-place edit of a factor (an optimizer step): the folded weight is stale
        assert torch.allclose(layer(x), ref(), atol=1e-5) and layer._dense is not kept
        layer.up = nn.Parameter(torch.randn(24, 3))  # a replaced factor: a new tensor at version 0
        assert torch.allclose(layer(x), ref(), atol=1e-5)
        assert layer.to(torch.float64).__dict__.get("_dense") is None  # a move or cast drops the CPU copy
    layer.float()
    out = layer(x)  # grad enabled, trainable factors: the unfolded path, so down and up get gradients
    out.sum().backward()
    assert layer._dense.shape == (24, 64) and layer.down.grad is not None and layer.up.grad is not None


def test_quantlinear_pads_a_width_the_group_does_not_divide():
    torch.manual_seed(3)
    linear = nn.Linear(40, 9)  # a pruned width: 40 = 32 + 8
    layer = QuantLinear.from_linear(linear, bits=4, group=32, rank=2)
    assert (layer.in_features, layer.packed_in_features, layer.rank) == (40, 64, 2)
    assert layer.down.shape == (2, 64) and layer.scale.shape == (9, 2)
    padded = nn.functional.pad(linear.weight.detach(), (0, 24))
    assert torch.equal(layer.dequantized_weight(), fake_quantize(padded, 4, 32)[:, :40])
    x = torch.randn(5, 40)
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().t() + linear.bias, atol=1e-5)
    empty = QuantLinear.empty(40, 9, 4, 32, rank=2, bias=True)
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty(x), layer(x))
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(5, 64))


def test_quantlinear_from_quantized_and_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(1)
    q, s, z = quantize_groups(torch.randn(33, 128, generator=gen), 2, 32)
    layer = QuantLinear.from_quantized(q, s, z, 2, 32, down=torch.randn(4, 128, generator=gen),
                                       up=torch.randn(33, 4, generator=gen))
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = QuantLinear(128, 33, bits=2, group=32, rank=4, dtype=torch.float32)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(unpack(fresh.packed, 2, 128), q)
    x = torch.randn(5, 128, generator=gen)
    assert torch.equal(fresh(x), layer(x))


BAD_INPUTS = [
    (dict(bits=5), "unsupported bit width"),
    (dict(group=48), "unsupported group size"),
    (dict(x=torch.zeros(2, 96)), "not a multiple of the group size"),
    (dict(packed=torch.zeros(10, 16, dtype=torch.int32)), "packed must be int32 of shape"),
    (dict(packed=torch.zeros(10, 32, dtype=torch.int64)), "packed must be int32 of shape"),
    (dict(out_features=11), "does not match packed rows"),
    (dict(scale=torch.ones(10, 2)), "scale must be fp16 of shape"),
    (dict(zero=torch.zeros(10, 3, dtype=torch.float16)), "zero must be fp16 of shape"),
    (dict(down=torch.zeros(4, 256)), "given together"),
    (dict(down=torch.zeros(4, 256), up=torch.zeros(10, 5)), "low-rank factors must be"),
    (dict(bias=torch.zeros(9)), "bias must have shape"),
    (dict(x=torch.zeros(2, 256, dtype=torch.int32)), "floating-point"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_inputs_name_the_problem(change, message):
    q, s, z = quantize_groups(torch.randn(10, 256), 4, 128)
    args = dict(x=torch.zeros(2, 256), packed=pack(q, 4), scale=s, zero=z, bits=4, group=128)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        lowbit_linear(**args)


def test_pack_errors():
    with pytest.raises(ValueError, match="outside"):
        pack(torch.full((2, 32), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(2, 48, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="packed must be int32"):
        unpack(torch.zeros(2, 4, dtype=torch.int32), 4, 64)
