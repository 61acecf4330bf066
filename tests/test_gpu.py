"""GPU-only checks (skipped without CUDA): the CUDA-graph decode path generates exactly what eager
greedy decoding generates, and is faster."""

import pytest
import torch

from slimforge.evaluate.speed import decode_tokens_per_s, eager_decode, graph_decode
from tests.helpers import ARCHS, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graph_decode_matches_eager(arch, tokenizer):
    model = tiny_model(arch, tokenizer, seed=2).cuda()
    eager, _ = eager_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    graph, _ = graph_decode(model, batch_size=3, prompt_len=7, new_tokens=20)
    assert torch.equal(eager, graph)


def test_graph_decode_is_faster_than_eager(tokenizer):
    model = tiny_model("llama", tokenizer, layers=6).cuda()
    graph, mode = decode_tokens_per_s(model, new_tokens=64)
    eager, _ = decode_tokens_per_s(model, new_tokens=64, cuda_graph=False)
    assert mode == "cuda-graph" and graph > 1.5 * eager
