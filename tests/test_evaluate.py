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


def test_grouped_rows_are_pycils_10_class_blocks():
    """utils/toolkit.py `accuracy` (PyCIL 87cc411): blocks of 10 labels from 0 below the largest."""
    protocol = Protocol(class_order=tuple(range(25)), phase_sizes=(20, 5))
    y = np.arange(25)
    scores = np.eye(25)
    scores[[0, 1, 12], :] = np.eye(25)[[5, 5, 5]]  # two wrong in 0-9, one in 10-19
    out = evaluate.evaluate_phase(scores, y, protocol, 1)
    assert out["grouped_row"] == [0.8, 0.9, 1.0]  # 00-09, 10-19, 20-29


def test_pycil_forgetting_follows_its_formula():
    """trainer.py lines 122-128: rows padded with 0, transposed, (max - last) over the first T-1."""
    grouped = [[0.9, 0.8], [0.5, 0.6, 0.95], [0.4, 0.7, 0.6, 0.9]]
    # blocks 0..2 (T - 1 = 2 of them: blocks 0 and 1): 0.9 - 0.4 and 0.8 - 0.7
    assert evaluate.pycil_forgetting(grouped) == pytest.approx((0.5 + 0.1) / 2)
    assert evaluate.pycil_forgetting([[0.9]]) is None
    # On equal 10-class phases it is `forgetting`, when no phase beats its best at the end.
    matrix = [[0.9], [0.6, 0.8], [0.3, 0.7, 0.9]]
    assert evaluate.pycil_forgetting(matrix) == pytest.approx(
        evaluate.summarize(matrix, [0.9, 0.7, 0.6])["forgetting"]
    )
