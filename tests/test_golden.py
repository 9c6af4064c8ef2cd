"""Every method's results on digits stay what they were: `tests/golden/digits_quick.json`.

The documents were recorded by `scripts/golden.py --quick` (3 phases, 2 epochs). Where the versions
and platform match the recorded ones, every number must be bit-identical: a refactoring that changes
a float anywhere fails here. Elsewhere (another jax, another CPU) floats may round differently, so
the accuracies are compared to 2 points and everything else exactly. Keys added to results.json
since the recording (new results, new config keys) are no difference; a key lost is. The tests check finetuning,
exemplars with NME (icarl) and a growing backbone (der); `python scripts/golden.py --quick
--check=tests/golden/digits_quick.json` checks every method (about 2.5 minutes, too long for CI).
"""

import json
import math
import os
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)

import golden  # noqa: E402

with open(os.path.join(os.path.dirname(__file__), "golden", "digits_quick.json")) as f:
    RECORDED = json.load(f)

METHODS = ("finetune", "icarl", "der")
TOLERANCE = 0.02  # accuracies, between environments


def near(expected, actual, path=""):
    """Paths where two documents differ beyond `TOLERANCE` in floats, or at all elsewhere."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) - set(actual):  # keys added since the recording are no difference
            return [f"{path}: keys {sorted(set(expected) - set(actual))} lost"]
        return [d for k in expected for d in near(expected[k], actual[k], f"{path}/{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)}"]
        return [
            d
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for d in near(e, a, f"{path}/{i}")
        ]
    if isinstance(expected, float) and isinstance(actual, float):
        return (
            []
            if math.isclose(expected, actual, abs_tol=TOLERANCE)
            else [f"{path}: {expected} vs {actual}"]
        )
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


@pytest.mark.parametrize("method", METHODS)
def test_results_match_the_recorded_ones(method):
    actual = golden.record([method], shortened=True)[method]
    expected = RECORDED[method]
    if RECORDED[golden.ENVIRONMENT] == golden.environment():
        diffs = golden.differences(expected, actual)
    else:
        diffs = near(expected, actual)
    assert not diffs, f"{method} results changed:\n" + "\n".join(diffs[:20])
