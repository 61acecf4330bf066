"""Embedded, seeded, checkable task suite (see suite.py for the JSONL schema and files)."""

from slimforge.tasks.families import (BASE_FAMILIES, FAMILIES, LORA_FAMILY, RL_FAMILY, corrupt,
                                      is_correct, numeric_reward, split_of)
from slimforge.tasks.records import load_records
from slimforge.tasks.suite import build_suite

__all__ = ["BASE_FAMILIES", "FAMILIES", "LORA_FAMILY", "RL_FAMILY", "build_suite", "corrupt",
           "is_correct", "load_records", "numeric_reward", "split_of"]
