"""Resumable training checkpoints: one file, replaced atomically, loaded with weights_only=True.

A checkpoint carries a fingerprint of everything that determines the run (params, data hash);
a checkpoint with another fingerprint is stale and ignored, so changing a param never resumes
into the wrong run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FILE = "state.pt"


def save_checkpoint(folder: str | Path, state: dict) -> None:
    """Write `state` (replacing the last one). Under torchrun only rank 0 writes; the others return."""
    from slimforge import distributed

    if not distributed.is_main():
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / FILE)


def load_checkpoint(folder: str | Path, fingerprint: str) -> dict | None:
    """The saved state if it exists and matches `fingerprint`, else None."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        return None
    return state
