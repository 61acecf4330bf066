"""Evaluation: one harness for every stage (see harness.py). Decode speed (speed.py) is a
benchmark outside the stages: import it from slimforge.evaluate.speed."""

from slimforge.evaluate.generation import exact_match, greedy_generate
from slimforge.evaluate.harness import evaluate, evaluate_suite, judge_accuracy
from slimforge.evaluate.scoring import next_token_probs, perplexity, response_nll, token_logprobs

__all__ = ["evaluate", "evaluate_suite", "exact_match", "greedy_generate",
           "judge_accuracy", "next_token_probs", "perplexity", "response_nll", "token_logprobs"]
