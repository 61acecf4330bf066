"""Triton-vs-reference cases for the fused log-softmax statistics, run by tests/test_kernels.py
under TRITON_INTERPRET=1 in a subprocess (the interpreter must be chosen before Triton compiles)
and directly on a GPU. `python -m tests.kernel_cases cpu|cuda` prints one line per failure."""

from __future__ import annotations

import sys
import zlib

import torch

from kernels.logsoftmax_stats import entropy, kl_divergence, token_logprobs, use_triton
from kernels.reference import entropy_ref, kl_divergence_ref, token_logprobs_ref

# value and gradient tolerances per dtype (bf16 gradients carry bf16 rounding)
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 8e-3), torch.float16: (2e-5, 2e-3)}


def cases(device: str) -> list[str]:
    failures = []
    shapes = [(5, 1000), (3, 333), (2, 4, 257)] if device == "cpu" else [(37, 32000), (8, 151936), (2, 3, 50257)]
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for shape in shapes:
        for dtype in dtypes:
            # a stable seed per case: hash() of a str changes with every process (PYTHONHASHSEED), so
            # the inputs did too, and one draw in a few hundred put an fp32 KL gradient past its tolerance
            gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype))).encode()))
            p = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
            q = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
            if len(shape) == 2 and shape[0] > 2:
                p[1, : shape[-1] // 3] = float("-inf")  # a masked vocabulary slice
            t = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(device)
            t.view(-1)[0] = -100  # one ignored position
            g = torch.randn(shape[:-1], generator=gen).to(device)
            vtol, gtol = TOL[dtype]
            tests = {"kl": (kl_divergence, kl_divergence_ref, (p, q)),
                     "logprob": (token_logprobs, token_logprobs_ref, (q, t)),
                     "entropy": (entropy, entropy_ref, (p,))}
            for name, (fused, ref, inputs) in tests.items():
                ins_f = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
                ins_r = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
                assert use_triton(ins_f[0])
                out_f, out_r = fused(*ins_f), ref(*ins_r)
                err = (out_f - out_r).abs().max().item()
                scale = out_r.abs().max().item() + 1
                if not err <= vtol * scale * 10:
                    failures.append(f"{name} {shape} {dtype} value err {err:.3g}")
                grads_f = torch.autograd.grad((out_f * g).sum(), [x for x in ins_f if x.requires_grad])
                grads_r = torch.autograd.grad((out_r * g).sum(), [x for x in ins_r if x.requires_grad])
                for i, (a, b) in enumerate(zip(grads_f, grads_r)):
                    gerr = (a.float() - b.float()).abs().max().item()
                    if not gerr <= gtol * (b.float().abs().max().item() + 1e-3) + 1e-6:
                        failures.append(f"{name} {shape} {dtype} grad[{i}] err {gerr:.3g}")
    return failures


if __name__ == "__main__":
    found = cases(sys.argv[1])
    print("\n".join(found) if found else "all kernel cases match the reference")
    sys.exit(1 if found else 0)
