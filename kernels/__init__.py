"""Triton kernels shared by the stages: each op has a PyTorch reference, a launcher that checks
shapes and dtypes, and (where training needs it) an autograd.Function. Triton runs on CUDA; the
reference runs on CPU (tests also run the kernels on CPU under TRITON_INTERPRET=1).

- logsoftmax_stats: per-token log-prob, KL and entropy over large vocabularies, chunked.
- lowbit (+ lowbit_format): packed 2/3/4-bit group-quantized matmul with a fused low-rank
  correction and an input gradient; quant_linear.QuantLinear replaces nn.Linear on it. lowbit_tune holds its
  launch configs and tuner; lowbit_op registers it as the custom op torch.compile sees.
- dispatch: where an op runs (Triton on CUDA / under the interpreter, else the reference).
"""

# The low-bit formats every path supports (lowbit_format documents them). Here, torch-free, so a
# params schema can check a bit width without loading torch.
BITS = (2, 3, 4)
GROUPS = (32, 64, 128)
