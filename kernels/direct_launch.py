"""Launch a Triton kernel through its compiled kernel's own launcher once it has been compiled for
these arguments, skipping triton's JIT entry point (binding the arguments, working out and hashing
their specialisation: ~15 us of host time per launch on the H200 machine's host, against ~5.5 us for
the launcher, python -m experiments.qloram_host_cost). The low-bit kernels run a launch or two per
layer call, and an eager forward of a quantized model is host-bound at prefill sizes and in
QLoRAM training (benchmarks/2026-12-01-h200-prefill-host.json,
benchmarks/2026-11-30-h200-qloram-host-bound.json).

    from kernels.direct_launch import launch
    launch(kernel, grid, args, device, direct=True, num_warps=4, num_stages=3)  # == kernel[grid](*args, ...)

Compiled kernels are cached by everything triton specialises on, and more: each tensor's dtype and
address modulo 16 (alignment), every other argument's exact value (triton looks at "equal to 1",
"divisible by 16" and the integer width), the launch options and the device.
"""

from __future__ import annotations

import torch

try:
    import triton
except ImportError:  # no triton: nothing here is called
    triton = None

_COMPILED: dict[tuple, object] = {}
_MAX_ENTRIES = 4096


def _signature(value) -> object:
    return (value.dtype, value.data_ptr() & 15) if isinstance(value, torch.Tensor) else value


def launch(kernel, grid: tuple, args: tuple, device: torch.device, direct: bool = True, n_tensors: int | None = None,
           **options):
    """kernel[grid](*args, **options), `args` every parameter of the kernel in order (constexprs too,
    as values); through the cached compiled kernel when `direct` and on CUDA. n_tensors: only the
    first n arguments may be tensors (the rest are keyed as they are, without a look at each)."""
    if not direct or device.type != "cuda":
        return kernel[grid](*args, **options)
    n = len(args) if n_tensors is None else n_tensors
    key = (kernel, device.index, tuple(map(_signature, args[:n])), args[n:], tuple(sorted(options.items())))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **options)
        if len(_COMPILED) < _MAX_ENTRIES:
            _COMPILED[key] = compiled
        return compiled
    grid = tuple(grid) + (1,) * (3 - len(grid))
    stream, runtime = torch.cuda.current_stream(device).cuda_stream, triton.knobs.runtime
    # what triton's own launch does once it has the kernel (launch hooks included)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *args), runtime.launch_enter_hook,
                 runtime.launch_exit_hook, *args)
    return compiled
