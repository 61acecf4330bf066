"""The sweep's grid checks and the Pareto frontier on hand-made points (the flow itself runs on a
tiny grid in tests/test_pipeline_e2e.py, where a reproduced clone exists)."""

import pytest

from flows.sweep_params import SweepParams, expand_grid, point_name
from slimforge import SlimforgeError, pareto
from tests.conftest import REPO


def _params(grid, **kw):
    return SweepParams.model_validate({"name": "t", "grid": grid, **kw})


def test_grid_expands_to_every_combination_with_stable_names():
    points = expand_grid(_params({"params/quantize.yaml:bits": [2, 4], "params/quantize.yaml:rank": [2, 8],
                                  "params/lora.yaml:train.steps": [100, 200]}), REPO)
    assert len(points) == 8 and len({p["name"] for p in points}) == 8
    assert points[0]["overrides"] == {"params/quantize.yaml:bits": 2, "params/quantize.yaml:rank": 2,
                                      "params/lora.yaml:train.steps": 100}
    again = expand_grid(_params({"params/quantize.yaml:bits": [2, 4], "params/quantize.yaml:rank": [2, 8],
                                 "params/lora.yaml:train.steps": [100, 200]}), REPO)
    assert [p["name"] for p in again] == [p["name"] for p in points]  # what makes a rerun skip finished points
    assert point_name("t", {"a": 1, "b": 2}) == point_name("t", {"b": 2, "a": 1})


@pytest.mark.parametrize("grid,message", [
    ({"params/quantize.yaml:bitz": [2]}, r"params/quantize.yaml has no key 'bitz' \(allowed at top level: bits, budget"),
    ({"params/lora.yaml:train.stepz": [2]}, r"no key 'train.stepz' \(allowed at train: .*steps"),
    ({"params/nope.yaml:x": [1]}, r"'params/nope.yaml:x' is not 'params/<file>.yaml:<key>' .*params/base.yaml"),
    ({"bits": [2]}, r"'bits' is not 'params/<file>.yaml:<key>'"),
    ({"params/quantize.yaml:bits": [2, 5]}, r"point \{'params/quantize.yaml:bits': 5\}: .*bits: unsupported bit width; allowed: 2, 3, 4"),
    ({"params/quantize.yaml:bits": []}, r"'params/quantize.yaml:bits' has no values"),
    ({}, r"empty"),
])
def test_bad_grid_fails_before_any_point_naming_the_key(grid, message):
    with pytest.raises(SlimforgeError, match=message) as err:
        expand_grid(_params(grid), REPO)
    assert "\n" not in str(err.value)


def _pt(name, acc, mb, tps=100.0):
    return {"point": name, "params": {}, "model": "m", "accuracy": acc, "lo": acc - 0.02, "hi": acc + 0.02,
            "bytes": mb * 1e6, "tokens_per_s": tps}


def test_frontier_keeps_non_dominated_points_and_ties():
    points = [_pt("a", 0.90, 1.0), _pt("b", 0.85, 0.5), _pt("c", 0.85, 0.8),  # c: b is as good and smaller
              _pt("d", 0.95, 2.0), _pt("e", 0.95, 2.0), _pt("f", 0.80, 0.5)]  # d, e tie; f: b dominates it
    assert pareto.frontier(points, "bytes") == [True, True, False, True, True, False]
    speed = [_pt("x", 0.9, 1, tps=200), _pt("y", 0.9, 1, tps=100), _pt("z", 0.95, 1, tps=50)]
    assert pareto.frontier(speed, "tokens_per_s") == [True, False, True]  # higher tokens/s is better


def test_best_under_budget_is_the_most_accurate_that_fits():
    points = [_pt("a", 0.90, 1.0), _pt("b", 0.85, 0.5), _pt("c", 0.85, 0.4), _pt("d", 0.95, 2.0, tps=20)]
    assert pareto.best_under_budget(points) == 3
    assert pareto.best_under_budget(points, max_bytes=1.0e6) == 0
    assert pareto.best_under_budget(points, max_bytes=0.6e6) == 2  # accuracy tie: the smaller one
    assert pareto.best_under_budget(points, min_tokens_per_s=50) == 0
    assert pareto.best_under_budget(points, max_bytes=0.1e6) is None


def test_markdown_and_plot_mark_the_frontier(tmp_path):
    points = [_pt("a", 0.90, 1.0), _pt("b", 0.85, 0.5), _pt("c", 0.80, 0.8), _pt("d", 0.90, 1.0)]  # a, d tie
    on = pareto.frontier(points, "bytes")
    table = pareto.markdown(points, on, None, [])
    lines = table.splitlines()
    assert "test accuracy" not in lines[0]  # shown only when every candidate has it
    with_test = pareto.markdown([{**p, "test": {"value": 0.5, "lo": 0.4, "hi": 0.6}} for p in points], on, None, [])
    assert "| 0.500 [0.400, 0.600] |" in with_test.splitlines()[2]
    assert lines[2].startswith("| a |") and lines[2].endswith("**yes** |") and lines[5].startswith("| c |")
    assert not lines[5].endswith("**yes** |")
    path = pareto.plot(points, on, pareto.frontier(points, "tokens_per_s"), tmp_path / "f.png")
    assert path.stat().st_size > 10_000
