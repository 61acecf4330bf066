"""slimforge: one reproducible pipeline to prune, quantize, LoRA-train, filter, RL-train and package
a causal LM. The library half: configs, artifact I/O, tasks, models, evaluation, tracking, CLI.

Run the whole pipeline with `dvc repro` (or `slimforge run` through Prefect); see README.md.
"""

__version__ = "0.1.0"


class SlimforgeError(Exception):
    """A user-facing error: bad params, bad input files, missing models. The CLI entries print its
    one-line message and exit with status 2 instead of a traceback."""
