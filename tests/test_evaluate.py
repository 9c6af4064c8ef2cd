import numpy as np
import pytest

from incremental import evaluate
from incremental.protocol import Protocol


def test_rows_from_scores_class_and_task_aware():
    protocol = Protocol(class_order=(0, 1, 2, 3), phase_sizes=(2, 2))
    y = np.array([0, 1, 2, 3])
    # Example 0 is confused with class 2 (another phase) but right within its phase.
    scores = np.array([[0.5, 0.1, 0.9, 0.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.2, 0.1]])
    out = evaluate.evaluate_phase(scores, y, protocol, 1)
    assert out["row"] == [0.5, 0.5]
    assert out["task_aware_row"] == [1.0, 0.5]
    assert out["accuracy"] == 0.5
    assert out["old_accuracy"] == 0.5 and out["new_accuracy"] == 0.5


def test_summary_metrics():
    matrix = [[0.9], [0.6, 0.8], [0.3, 0.7, 0.9]]
    summary = evaluate.summarize(matrix, [0.9, 0.7, 0.6])
    assert summary["last_accuracy"] == 0.6
    assert summary["average_incremental_accuracy"] == pytest.approx(0.7333333)
    # forgetting: phase 0 best 0.9 -> 0.3 (0.6); phase 1 best 0.8 -> 0.7 (0.1)
    assert summary["forgetting"] == pytest.approx(0.35)
    assert summary["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert evaluate.summarize([[0.9]], [0.9])["forgetting"] is None
