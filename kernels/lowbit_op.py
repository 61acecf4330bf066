"""The low-bit matmul as a PyTorch custom op, `torch.ops.slimforge.lowbit_linear`, so that
torch.compile sees one opaque node instead of tracing into the launcher (whose config table and
tuner would break the graph at every layer): a compiled model keeps its whole decoder in one graph
and inductor fuses the code around our kernels (issue 19).

    y = torch.ops.slimforge.lowbit_linear(x, packed, scale, zero, bits, group, down, up, bias)

Same arguments and result as kernels.lowbit.lowbit_linear. Inference only: it has no autograd
formula, so QuantLinear calls it only while torch.compile traces a forward that needs no
gradients; everywhere else it calls lowbit_linear (differentiable) directly.
"""

# no `from __future__ import annotations`: torch.library reads the signature's types at runtime
from typing import Optional

import torch

from kernels.lowbit import lowbit_linear


@torch.library.custom_op("slimforge::lowbit_linear", mutates_args=())
def lowbit_linear_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                     group: int, down: Optional[torch.Tensor], up: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return lowbit_linear(x, packed, scale, zero, bits, group, None, down, up, bias)


@lowbit_linear_op.register_fake
def _output_like(x, packed, scale, zero, bits, group, down, up, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0])
