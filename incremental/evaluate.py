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
  learning_accuracy[j]   A[j][j], accuracy on phase j just after learning it; its mean is Riemer et
                         al. 2019's "learning accuracy" (average_learning_accuracy).
  forward_transfer       mean over phases i >= 1 of A[i-1][i] - b[i] (Lopez-Paz & Ranzato 2017), with
                         b[i] the random-init model's accuracy on phase i's test data (scored once,
                         at phase 0's init). Defined where a phase can be scored before it is
                         learned: the domain scenario; in the class and task scenarios a phase's
                         classes have no head columns before it, and it is None.
  top5_accuracy[i]       the label among the 5 highest scores over all seen classes (no task label),
                         for protocols of at least TOP5_MIN_CLASSES classes.
  In the task scenario (`protocol.scenario='task'`) the headline matrix, accuracy, old and new
  accuracy are the task-aware ones (task-incremental); the one-head numbers are class_incremental_*.
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
TOP5_MIN_CLASSES = 20  # top-5 accuracy is reported for protocols of at least this many classes


def evaluate_phase(
    scores: np.ndarray, y: np.ndarray, protocol: Protocol, phase: int, *,
    test_phase: np.ndarray | None = None, task_labels: bool = False,
) -> dict:  # fmt: skip
    """One row of every matrix from the scores (N, num_seen) of the test examples `y`.

    `test_phase` is each example's phase: by default its class's; in the domain scenario its
    domain, and examples of phases after `phase` (the domains to come) count only in `ahead_row`,
    their accuracies before they are learned (forward transfer). `task_labels` (the task scenario)
    makes the task-aware numbers the headline (`task_incremental`). `top5_accuracy` is reported
    where the protocol has at least `TOP5_MIN_CLASSES` classes.
    """
    test_phase = protocol.phase_of(y) if test_phase is None else test_phase
    ahead = test_phase > phase
    if ahead.any():
        now = ~ahead
        row = evaluate_phase(
            scores[now], y[now], protocol, phase, test_phase=test_phase[now],
            task_labels=task_labels,
        )  # fmt: skip
        correct = scores[ahead].argmax(axis=1) == y[ahead]
        later = range(phase + 1, protocol.num_phases)
        return {**row, "ahead_row": by_phase(correct, test_phase[ahead], later)}
    pred = scores.argmax(axis=1)
    correct, task_correct = pred == y, task_aware_correct(scores, y, test_phase, protocol)
    counts = np.bincount(test_phase, minlength=phase + 1)
    row = by_phase(correct, test_phase, range(phase + 1))
    task_row = by_phase(task_correct, test_phase, range(phase + 1))
    grouped = [
        float(np.mean(pred[block] == y[block]))
        for start in range(0, int(y.max()), PYCIL_BLOCK)
        if (block := (y >= start) & (y < start + PYCIL_BLOCK)).any()
    ]
    tested = np.flatnonzero(counts)
    old = test_phase < phase
    out = {
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
    if protocol.num_classes >= TOP5_MIN_CLASSES:
        out["top5_accuracy"] = top_k_accuracy(scores, y, 5)
    return task_incremental(out, task_correct, old) if task_labels else out


def by_phase(correct: np.ndarray, test_phase: np.ndarray, phases) -> list[float | None]:
    """The fraction of `correct` among each phase's examples; None for a phase with none."""
    return [
        float(np.mean(correct[test_phase == j])) if (test_phase == j).any() else None
        for j in phases
    ]


def task_aware_correct(
    scores: np.ndarray, y: np.ndarray, test_phase: np.ndarray, protocol: Protocol
) -> np.ndarray:
    """Per example: whether the argmax over its phase's classes alone is its label (the task label
    given). A phase that brings no classes of its own (a domain) chooses among all seen ones."""
    return task_aware_predictions(scores, test_phase, protocol) == y


def task_aware_predictions(
    scores: np.ndarray, test_phase: np.ndarray, protocol: Protocol
) -> np.ndarray:
    """Per example, the class of highest score among its phase's classes alone (the task label
    given); among all seen ones for a phase that brings no classes of its own (a domain)."""
    offsets, pred = protocol.offsets, np.zeros(len(scores), np.int64)
    for j in np.unique(test_phase):
        mine = test_phase == j
        lo, hi = (offsets[j], offsets[j + 1]) if protocol.phase_sizes[j] else (0, scores.shape[1])
        pred[mine] = scores[mine, lo:hi].argmax(axis=1) + lo
    return pred


def task_incremental(row: dict, task_correct: np.ndarray, old: np.ndarray) -> dict:
    """`row` of the task scenario: the task-aware numbers are its headline (`row`, `accuracy`,
    `old_accuracy`, `new_accuracy`) and the one-head numbers stay as `class_incremental_*`."""
    return {
        **row,
        "row": row["task_aware_row"],
        "accuracy": row["task_aware_accuracy"],
        "old_accuracy": float(np.mean(task_correct[old])) if old.any() else None,
        "new_accuracy": float(np.mean(task_correct[~old])) if (~old).any() else None,
        "class_incremental_row": row["row"],
        "class_incremental_accuracy": row["accuracy"],
    }


def top_k_accuracy(scores: np.ndarray, y: np.ndarray, k: int) -> float:
    """The fraction of examples whose label is among the `k` highest scores."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == y[:, None]).any(axis=1)))


def confusion(pred: np.ndarray, y: np.ndarray, num_seen: int) -> np.ndarray:
    """The (num_seen, num_seen) counts of test examples by true class (rows) and prediction."""
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


def transfer(
    matrix: list[list[float | None]], before: list | None = None, init: list | None = None
) -> dict:
    """Learning accuracy and forward transfer of a (possibly unfinished) run's matrix rows.

    `before[i]` is the accuracy on phase i's test data after phase i - 1 (`A[i-1][i]`; None for
    phase 0) and `init[i]` the random-init model's; both None where no phase can be scored before
    it is learned (the class and task scenarios): forward transfer is then None.
    """
    learning = [row[j] for j, row in enumerate(matrix)]
    known = [a for a in learning if a is not None]
    pairs = []
    if before is not None and init is not None:
        pairs = [(b, init[i]) for i, b in enumerate(before) if i and b is not None]
    return {
        "learning_accuracy": learning,
        "average_learning_accuracy": float(np.mean(known)) if known else None,
        "forward_transfer": float(np.mean([b - i for b, i in pairs])) if pairs else None,
    }


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
