"""Decode throughput: tokens generated per second after a prefill.

On a GPU each decode step runs from a static KV cache and is replayed as one CUDA graph: eager
decoding of a small model is launch-bound (hundreds of tiny kernels per token), which would hide
exactly what pruning and quantization buy. On a CPU eager decoding with a dynamic cache is the
honest measure.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from slimforge.modeling import cache_kwarg

WARMUP = 3


def _prefill(model: PreTrainedModel, cache, batch_size: int, prompt_len: int) -> torch.Tensor:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen).to(device)
    logits = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def _eager_speed(model: PreTrainedModel, batch_size: int, prompt_len: int, new_tokens: int) -> float:
    cache = DynamicCache()
    token = _prefill(model, cache, batch_size, prompt_len)
    kw = {cache_kwarg(model): cache}
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(input_ids=token, use_cache=True, **kw).logits[:, -1].argmax(-1, keepdim=True)
    if token.is_cuda:
        torch.cuda.synchronize()
    return batch_size * new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def _graph_speed(model: PreTrainedModel, batch_size: int, prompt_len: int, new_tokens: int) -> float:
    # The static cache keeps its fill level in a device tensor that each step bumps in place, so
    # the captured graph advances by itself; we only move the rotary position along with it.
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + WARMUP + new_tokens + 1)
    token = _prefill(model, cache, batch_size, prompt_len)
    position = torch.full((batch_size, 1), prompt_len, device=token.device)
    kw = {cache_kwarg(model): cache}

    def step() -> torch.Tensor:
        logits = model(input_ids=token, position_ids=position, use_cache=True, **kw).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture: allocator, lazy init, autotune
        for _ in range(WARMUP):
            token.copy_(step())
            position += 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        next_token = step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        graph.replay()
        token.copy_(next_token)
        position += 1
    torch.cuda.synchronize()
    return batch_size * new_tokens / (time.perf_counter() - start)


def decode_tokens_per_s(model: PreTrainedModel, batch_size: int = 1, prompt_len: int = 16,
                        new_tokens: int = 64, cuda_graph: bool = True) -> tuple[float, str]:
    """(tokens/s, mode) where mode is 'cuda-graph' or 'eager'. The context stays within the
    model's max_position_embeddings."""
    limit = getattr(model.config, "max_position_embeddings", prompt_len + new_tokens + 8)
    new_tokens = max(1, min(new_tokens, limit - prompt_len - WARMUP - 1))
    was_training = model.training
    model.eval()
    try:
        if cuda_graph and next(model.parameters()).is_cuda:
            return _graph_speed(model, batch_size, prompt_len, new_tokens), "cuda-graph"
        _eager_speed(model, batch_size, prompt_len, min(new_tokens, WARMUP))  # warm-up
        return _eager_speed(model, batch_size, prompt_len, new_tokens), "eager"
    finally:
        model.train(was_training)
