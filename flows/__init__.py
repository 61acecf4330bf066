"""Prefect flows that chain, schedule and sweep the DVC stages (they drive DVC, never stage code)."""
