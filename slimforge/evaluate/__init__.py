"""Evaluation: one harness for every stage (see harness.py)."""

from slimforge.evaluate.generation import exact_match, greedy_generate
from slimforge.evaluate.harness import evaluate, evaluate_suite, judge_accuracy
from slimforge.evaluate.scoring import next_token_probs, perplexity, response_nll, token_logprobs
from slimforge.evaluate.speed import decode_tokens_per_s

__all__ = ["decode_tokens_per_s", "evaluate", "evaluate_suite", "exact_match", "greedy_generate",
           "judge_accuracy", "next_token_probs", "perplexity", "response_nll", "token_logprobs"]
