"""Pipeline stages: one package per stage, each with pure functions and a `run()`; `python -m
stages.<name>` is the entry dvc.yaml calls."""
