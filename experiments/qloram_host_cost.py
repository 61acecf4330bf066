"""Issue 19 probe: the host's cost per QLoRAM layer call (experiments/qloram_slow_steps.py found the
8B-shape QLoRAM step host-bound: the GPU waits for launches, the host is never ahead).

    python -m experiments.qloram_host_cost

Tiny shapes (M=128 rows on the dequantise path, 256 x 256 weight), so each call's GPU work is a few
microseconds and back-to-back calls measure what the host spends on them. Microseconds per call:
bf16 F.linear forward and forward+backward (LoRAM's base layer), the dequantise kernel launched
through triton's JIT entry point and through the compiled kernel's own launcher (what triton's
run() does after its cache lookup), dequantize() with the direct launch (kernels.lowbit_dequant.DIRECT_LAUNCH) and without, the autograd
Function and dequant_linear under lowbit_linear, lowbit_linear forward and forward+backward (its
checks every call), QuantLinear forward+backward (checks once per set of tensors).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from kernels.lowbit import lowbit_linear
import kernels.lowbit_dequant as lowbit_dequant
from kernels.lowbit_dequant import _dequant_kernel, _DequantMatmul, dequant_linear, dequantize
from kernels.quant_linear import QuantLinear


def host_us(fn, n: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    q = QuantLinear.from_linear(lin, bits=4, group=128)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(256, 256, device="cuda", dtype=torch.bfloat16)
    args = (q.packed, q.scale, q.zero, out, 256, q.packed.stride(0), q.scale.stride(0), out.stride(0))
    meta = dict(BITS=4, GROUP=128, BLOCK_N=8, UNITS=8, num_warps=4)
    grid = (32, 1)
    compiled = _dequant_kernel[grid](*args, **meta)
    stream = torch.cuda.current_stream().cuda_stream
    all_args = (*args, 4, 128, 8, 8)

    def fast_launch():
        compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *all_args)

    ref = out.clone()
    out.zero_()
    fast_launch()
    torch.cuda.synchronize()
    rows = {
        "fast_launch_matches": bool(torch.equal(out, ref)),
        "F.linear fwd": host_us(lambda: F.linear(x, lin.weight)),
        "F.linear fwd+bwd": host_us(lambda: F.linear(x, lin.weight).backward(g), 1000),
        "triton jit launch": host_us(lambda: _dequant_kernel[grid](*args, **meta)),
        "compiled kernel launch": host_us(fast_launch),
        "torch.empty 256x256": host_us(lambda: torch.empty(256, 256, device="cuda", dtype=torch.bfloat16)),
        "dequantize() direct launch": host_us(lambda: dequantize(q.packed, q.scale, q.zero, 4, 128, 256, torch.bfloat16)),
        "_DequantMatmul fwd": host_us(lambda: _DequantMatmul.apply(x, q.packed, q.scale, q.zero, 4, 128)),
        "dequant_linear fwd": host_us(lambda: dequant_linear(x, q.packed, q.scale, q.zero, 4, 128, None, None, None)),
        "lowbit_linear fwd": host_us(lambda: lowbit_linear(x, q.packed, q.scale, q.zero, 4, 128, 256)),
        "lowbit_linear fwd+bwd": host_us(lambda: lowbit_linear(x, q.packed, q.scale, q.zero, 4, 128, 256).backward(g), 1000),
        "QuantLinear fwd+bwd": host_us(lambda: q(x).backward(g), 1000),
    }
    lowbit_dequant.DIRECT_LAUNCH = False
    rows["dequantize() jit launch"] = host_us(lambda: dequantize(q.packed, q.scale, q.zero, 4, 128, 256, torch.bfloat16))
    rows["QuantLinear fwd+bwd, jit launch"] = host_us(lambda: q(x).backward(g), 1000)
    lowbit_dequant.DIRECT_LAUNCH = True
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "us_per_call": rows}, indent=1))


if __name__ == "__main__":
    main()
