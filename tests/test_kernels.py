"""Fused log-softmax statistics: Triton against the PyTorch reference -- on CPU under the Triton
interpreter, and on a GPU when there is one -- plus input checks and the CPU fallback."""

import math

import pytest
import torch

from kernels.logsoftmax_stats import kl_divergence, token_logprobs
from kernels.reference import entropy_ref, kl_divergence_ref, token_logprobs_ref
from tests.conftest import REPO
from tests.helpers import run_cases_under_interpreter


def test_triton_matches_reference_under_interpreter():
    proc = run_cases_under_interpreter("tests.kernel_cases", REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_matches_reference_on_gpu():
    from tests.kernel_cases import cases

    assert cases("cuda") == []


def test_references_by_hand():
    logits = torch.tensor([[0.0, 0.0], [0.0, float("-inf")]])
    assert torch.allclose(entropy_ref(logits), torch.tensor([math.log(2), 0.0]))
    p, q = torch.tensor([[0.0, 0.0]]), torch.log(torch.tensor([[0.25, 0.75]]))  # p uniform
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert torch.allclose(kl_divergence_ref(p, q), torch.tensor([expected]))
    got = token_logprobs_ref(q.expand(2, 2), torch.tensor([1, -100]))
    assert torch.allclose(got, torch.tensor([math.log(0.75), 0.0]))


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="targets shape"):
        token_logprobs(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
