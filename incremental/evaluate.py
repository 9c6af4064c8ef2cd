"""Evaluation after each phase and the run's summary metrics; host-side numpy over class scores.

Vocabulary (all accuracies are fractions in [0, 1]):
  accuracy_matrix[i][j]  accuracy on phase j's test classes after training phase i (j <= i), one head,
                         no task label (class-incremental).
  task_aware_matrix[i][j] the same with the scores restricted to phase j's classes (task label given).
  accuracy[i]            accuracy on the test data of every class seen after phase i.
  average_incremental_accuracy  mean of accuracy[i] over phases (iCaRL, PyCIL).
  last_accuracy          accuracy[-1].
  forgetting             mean over old phases j of max_{i<T-1} A[i][j] - A[T-1][j] (Chaudhry et al. 2018).
  backward_transfer      mean over old phases j of A[T-1][j] - A[j][j] (Lopez-Paz & Ranzato 2017).
  forgetting_pycil       PyCIL's figure (trainer.py lines 122-128 at 87cc411): accuracy on blocks of
                         10 classes in class order (utils/toolkit.py `accuracy`, lines 50-59, whose
                         blocks start below the largest seen label), then the mean over the first
                         T-1 blocks of (max over every phase, the last included) - (last phase), a
                         block not yet seen counting 0. Equal to `forgetting` on B0-Inc10 up to the
                         last phase in the max; on B50 protocols it averages phase 0's blocks only.
"""

from __future__ import annotations

import numpy as np

from incremental.protocol import Protocol

PYCIL_BLOCK = 10  # classes per block of PyCIL's grouped accuracy


def evaluate_phase(scores: np.ndarray, y: np.ndarray, protocol: Protocol, phase: int) -> dict:
    """One row of every matrix from the scores (N, num_seen) of the seen-class test examples `y`."""
    pred = scores.argmax(axis=1)
    test_phase = protocol.phase_of(y)
    offsets = protocol.offsets
    row, task_row = [], []
    counts = np.bincount(test_phase, minlength=phase + 1)
    for j in range(phase + 1):
        mine = test_phase == j
        if not counts[j]:  # a phase that brought no new classes (`incremental learn`)
            row.append(None)
            task_row.append(None)
            continue
        row.append(float(np.mean(pred[mine] == y[mine])))
        local = scores[mine, offsets[j] : offsets[j + 1]].argmax(axis=1) + offsets[j]
        task_row.append(float(np.mean(local == y[mine])))
    grouped = [
        float(np.mean(pred[block] == y[block]))
        for start in range(0, int(y.max()), PYCIL_BLOCK)
        if (block := (y >= start) & (y < start + PYCIL_BLOCK)).any()
    ]
    tested = np.flatnonzero(counts)
    old = test_phase < phase
    return {
        "row": row,
        "task_aware_row": task_row,
        "accuracy": float(np.mean(pred == y)),
        "task_aware_accuracy": float(
            np.average([task_row[j] for j in tested], weights=counts[tested])
        ),
        "old_accuracy": float(np.mean(pred[old] == y[old])) if old.any() else None,
        "new_accuracy": float(np.mean(pred[~old] == y[~old])) if (~old).any() else None,
        "grouped_row": grouped,
    }


def confusion(scores: np.ndarray, y: np.ndarray, num_seen: int) -> np.ndarray:
    """The (num_seen, num_seen) counts of test examples by true class (rows) and prediction."""
    pred = scores.argmax(axis=1)
    return np.bincount(y * num_seen + pred, minlength=num_seen * num_seen).reshape(num_seen, -1)


def per_class_accuracy(counts: np.ndarray) -> list[float | None]:
    """Each class's accuracy from a confusion matrix; None for a class with no test example."""
    totals = counts.sum(axis=1)
    return [float(c / t) if t else None for c, t in zip(np.diag(counts), totals, strict=True)]


def summarize(accuracy_matrix: list[list[float]], accuracy: list[float]) -> dict:
    """The headline metrics of a (possibly unfinished) run from its matrix rows so far."""
    last = len(accuracy_matrix) - 1
    summary = {
        "last_accuracy": accuracy[-1],
        "average_incremental_accuracy": float(np.mean(accuracy)),
        "forgetting": None,
        "backward_transfer": None,
    }
    a = accuracy_matrix
    old = [j for j in range(last) if a[last][j] is not None]  # None: a phase of no new classes
    if old:
        summary["forgetting"] = float(
            np.mean([max(a[i][j] for i in range(j, last)) - a[last][j] for j in old])
        )
        summary["backward_transfer"] = float(np.mean([a[last][j] - a[j][j] for j in old]))
    return summary


def pycil_forgetting(grouped_rows: list[list[float]]) -> float | None:
    """PyCIL's forgetting from each phase's accuracies on 10-class blocks (module doc)."""
    last = len(grouped_rows) - 1
    if last < 1:
        return None
    table = np.zeros((last + 1, max(len(r) for r in grouped_rows)))
    for i, row in enumerate(grouped_rows):
        table[i, : len(row)] = row
    table = table.T  # blocks x phases
    return float(np.mean((table.max(axis=1) - table[:, last])[:last]))
