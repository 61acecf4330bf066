"""Decode throughput: tokens generated per second after a prefill.

On a GPU each decode step runs from a static KV cache and is replayed as one CUDA graph: eager
decoding of a small model is launch-bound (hundreds of tiny kernels per token), which would hide
exactly what pruning and quantization buy. On a CPU eager decoding with a dynamic cache is the
honest measure.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, LlamaConfig, PreTrainedModel, StaticCache

from slimforge.modeling import cache_kwarg

WARMUP = 3


def _prompt(model: PreTrainedModel, batch_size: int, prompt_len: int) -> torch.Tensor:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen).to(device)


def _next(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


@torch.no_grad()
def eager_decode(model: PreTrainedModel, batch_size: int, prompt_len: int, new_tokens: int
                 ) -> tuple[torch.Tensor, float]:
    """Greedy decode with a dynamic cache: (generated ids [B, new_tokens], seconds after prefill)."""
    cache = DynamicCache()
    kw = {cache_kwarg(model): cache}
    token = _next(model(input_ids=_prompt(model, batch_size, prompt_len), use_cache=True, **kw).logits)
    out = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = _next(model(input_ids=token, use_cache=True, **kw).logits)
        out.append(token)
    if token.is_cuda:
        torch.cuda.synchronize()
    return torch.cat(out, 1), time.perf_counter() - start


@torch.no_grad()
def graph_decode(model: PreTrainedModel, batch_size: int, prompt_len: int, new_tokens: int
                 ) -> tuple[torch.Tensor, float]:
    """Greedy decode from a static cache, each step one CUDA graph replay: (generated ids
    [B, new_tokens], seconds of the replayed steps). The first WARMUP steps run eagerly (they
    prime the allocator and lazy cache init) and are part of the ids, not of the timing."""
    # The static cache keeps its fill level in a device tensor that each step bumps in place, so
    # the captured graph advances by itself; we only move the rotary position along with it.
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
    kw = {cache_kwarg(model): cache}
    token = _next(model(input_ids=_prompt(model, batch_size, prompt_len), use_cache=True, **kw).logits)
    position = torch.full((batch_size, 1), prompt_len, device=token.device)

    def step() -> torch.Tensor:
        return _next(model(input_ids=token, position_ids=position, use_cache=True, **kw).logits)

    out = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            token.copy_(step())
            position += 1
            out.append(token.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        next_token = step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens - WARMUP):
        graph.replay()
        token.copy_(next_token)
        position += 1
        out.append(token.clone())
    torch.cuda.synchronize()
    return torch.cat(out, 1), time.perf_counter() - start


def decode_tokens_per_s(model: PreTrainedModel, batch_size: int = 1, prompt_len: int = 16,
                        new_tokens: int = 64, cuda_graph: bool = True) -> tuple[float, str]:
    """(steady decode tokens/s after a warm-up run, mode) where mode is 'cuda-graph' (static
    cache, each step one graph replay) or 'eager'. Times exactly `new_tokens` greedy steps per
    sequence after a `prompt_len`-token prompt (the graph path's WARMUP eager steps come before
    them, untimed); a context past the model's max_position_embeddings is an error, not a silent
    shorter run."""
    warmup = WARMUP if cuda_graph and next(model.parameters()).is_cuda else 0
    limit = getattr(model.config, "max_position_embeddings", None)
    if new_tokens < 1 or (limit is not None and prompt_len + warmup + new_tokens + 1 > limit):
        raise ValueError(f"prompt_len={prompt_len} + new_tokens={new_tokens} (+{warmup} warm-up steps) does not "
                         f"fit the model's {limit} positions")
    was_training = model.training
    model.eval()
    try:
        if warmup:
            graph_decode(model, batch_size=batch_size, prompt_len=prompt_len, new_tokens=2 * WARMUP)  # kernels, autotuning, allocator
            _, seconds = graph_decode(model, batch_size=batch_size, prompt_len=prompt_len, new_tokens=WARMUP + new_tokens)
            return batch_size * new_tokens / seconds, "cuda-graph"
        eager_decode(model, batch_size=batch_size, prompt_len=prompt_len, new_tokens=WARMUP)  # warm-up
        _, seconds = eager_decode(model, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens)
        return batch_size * new_tokens / seconds, "eager"
    finally:
        model.train(was_training)


def llama3_8b_shape(layers: int = 32) -> LlamaConfig:
    """Llama-3-8B's shape (GQA 32/8, MLP 14336, vocabulary 128256) for speed runs with random weights."""
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
