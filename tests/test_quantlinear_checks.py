"""QuantLinear checks its tensors once per set of tensors (the checks cost about a kernel launch of
host time per call on a GPU host), and again whenever one of them, x's dtype or x's device changes."""

import pytest
import torch
from torch import nn

import kernels.quant_linear as quant_linear
from kernels.quant_linear import QuantLinear


@pytest.fixture
def calls(monkeypatch):
    """The x dtypes QuantLinear._lowbit ran its checks for (the kernels themselves replaced by a no-op)."""
    seen = []
    real_check = quant_linear.check_lowbit_args

    def check(*args, **kwargs):
        seen.append(args[0].dtype)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(quant_linear, "check_lowbit_args", check)
    monkeypatch.setattr(quant_linear, "lowbit_linear_checked", lambda x, *rest: x)
    return seen


def test_checks_run_once_per_set_of_tensors_and_again_when_one_changes(calls):
    layer = QuantLinear.from_linear(nn.Linear(256, 10, bias=False), bits=4, group=128)
    x = torch.randn(3, 256, dtype=torch.float16)
    for _ in range(3):
        layer._lowbit(x, None)
    assert len(calls) == 1
    layer._lowbit(x.bfloat16(), None)  # another dtype: checked again
    assert calls == [torch.float16, torch.bfloat16]
    layer.scale = torch.ones(10, 3, dtype=torch.float16)  # a new tensor of the wrong shape is caught
    with pytest.raises(ValueError, match="scale must be fp16 of shape"):
        layer._lowbit(x, None)


def test_moving_or_casting_drops_the_checked_tensors(calls):
    layer = QuantLinear.from_linear(nn.Linear(256, 10), bits=4, group=128)
    x = torch.randn(3, 256, dtype=torch.float16)
    layer._lowbit(x, layer.bias)
    assert "_checked" in layer.__dict__
    layer.to(torch.float16)  # the old bias must not stay alive in the checked set
    assert "_checked" not in layer.__dict__
    layer._lowbit(x, layer.bias)
    assert len(calls) == 2
