"""Benchmark the fused log-softmax statistics against the plain PyTorch expressions, on one GPU.

    python -m kernels.bench_logsoftmax [--tokens 8192] [--vocab 32000 65536 128256 151936] [--json out.json]

For each op and vocabulary size: forward+backward time (median of CUDA-event timings) and peak
memory allocated above the inputs, for PyTorch eager (fp32 log_softmax, as people write it),
`torch.compile` of that same expression (the strongest standard baseline: Inductor fuses it) and
the Triton kernel, with the ratios. Logits are bf16, as a model emits them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys

import torch

from kernels.logsoftmax_stats import entropy, kl_divergence, token_logprobs


def torch_kl(p, q):
    logp, logq = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def torch_logprob(x, t):
    return torch.log_softmax(x.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def torch_entropy(x):
    logp = torch.log_softmax(x.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def measure(fn, inputs, grad_of, reps: int = 10) -> tuple[float, float]:
    """(median ms of forward+backward, peak MiB allocated above what existed before)."""
    for _ in range(2):
        fn(*inputs).sum().backward()
        for t in grad_of:
            t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs).sum().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        for t in grad_of:
            t.grad = None
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 65536, 128256, 151936])
    ap.add_argument("--json", help="also write the results here (command, commit, GPU, versions, rows)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    import triton

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    record = {"command": " ".join(["python -m kernels.bench_logsoftmax", *sys.argv[1:]]), "commit": commit,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "tokens": args.tokens, "rows": []}
    print(f"{record['gpu']}, {args.tokens} tokens, bf16 logits, forward+backward")
    print(f"{'op':10s} {'vocab':>7s} {'eager ms':>9s} {'compile ms':>10s} {'fused ms':>9s} {'vs eager':>8s} "
          f"{'vs compile':>10s} {'eager MiB':>10s} {'compile MiB':>11s} {'fused MiB':>10s}")
    for vocab in args.vocab:
        gen = torch.Generator(device=dev).manual_seed(0)
        p = (torch.randn(args.tokens, vocab, device=dev, generator=gen) * 2).bfloat16()
        q = (torch.randn(args.tokens, vocab, device=dev, generator=gen) * 2).bfloat16().requires_grad_()
        t = torch.randint(0, vocab, (args.tokens,), device=dev, generator=gen)
        cases = {"kl": (torch_kl, kl_divergence, (p, q)),
                 "logprob": (torch_logprob, token_logprobs, (q, t)),
                 "entropy": (torch_entropy, entropy, (q,))}
        for name, (ref, fused, inputs) in cases.items():
            compiled = torch.compile(ref, dynamic=False)
            ok = torch.allclose(ref(*inputs), fused(*inputs), atol=2e-3, rtol=1e-3)
            t_ref, m_ref = measure(ref, inputs, [q])
            t_cmp, m_cmp = measure(compiled, inputs, [q])
            t_fus, m_fus = measure(fused, inputs, [q])
            record["rows"].append({"op": name, "vocab": vocab, "eager_ms": t_ref, "compile_ms": t_cmp,
                                   "fused_ms": t_fus, "eager_mib": m_ref, "compile_mib": m_cmp, "fused_mib": m_fus,
                                   "matches_eager": ok})
            print(f"{name:10s} {vocab:7d} {t_ref:9.2f} {t_cmp:10.2f} {t_fus:9.2f} {t_ref / t_fus:7.2f}x "
                  f"{t_cmp / t_fus:9.2f}x {m_ref:10.0f} {m_cmp:11.0f} {m_fus:10.0f}" + ("" if ok else "  MISMATCH"))
        del p, q, t
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
