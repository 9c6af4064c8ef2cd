"""The evaluate stage: the final model scored on the test data of every seen class."""

from __future__ import annotations

import numpy as np

from incremental import capacity, evaluate, parallel, train
from incremental.methods import base
from incremental.phase.begin import phase_info
from incremental.phase.load import RunData
from incremental.phase.model import dtype_of, phase_model
from incremental.protocol import Protocol, scenario_of


def evaluate_phase(
    config, model, method, data: RunData, protocol: Protocol, phase, variables, method_state,
    programs: capacity.Programs | None = None, *, confusion: bool = False, extras: bool = True,
) -> dict:  # fmt: skip
    """Scores the test data of every seen class and returns the phase's rows of the matrices.

    The method's extra classifiers (e.g. nearest-mean) and companion models (`Method.companions`)
    are evaluated the same way, under `extra`. Under `head.capacity` the whole test set is scored,
    a shape that does not change with the phase, with the classes not seen yet masked, by
    functions kept in `programs` for later phases. With `confusion`, the row also holds the
    method's confusion matrix over the seen classes (`evaluate.confusion`; in the task scenario,
    each example predicted among its task's classes) under "confusion".
    `extras=False` scores the method's `predict` alone (an evaluation within the phase).
    In the domain scenario every domain's test data is scored, the later ones for `ahead_row`; in
    the task scenario the task-aware numbers are the headline (`evaluate.evaluate_phase`).
    """
    config = capacity.resolved(config, method, protocol.num_classes)
    num_seen = protocol.num_seen(phase)
    domains = data.test_arrival  # the domain scenario scores every domain: later ones too
    seen = data.y_test < num_seen if domains is None else np.ones(len(data.y_test), bool)
    test_phase = None if domains is None else domains[seen]
    task = scenario_of(config) == "task"
    wide = capacity.width(config) > 0
    programs = programs or capacity.Programs()
    eval_state = base.select_state(method_state, method.eval_keys)
    mesh = parallel.mesh_of(variables)
    if wide and mesh is not None:  # placed alike in every phase, so the program is the same
        eval_state = parallel.replicate(eval_state, mesh)
    dtype = dtype_of(config)

    def rows(name, predict_fn, model=model, variables=variables, counts=False):
        build = lambda: train.make_apply_batches(model, data.norm, predict_fn, dtype, mask=wide)  # noqa: E731
        apply = programs.get(("eval", name), build) if wide else build()
        x = data.x_test if wide else data.x_test[seen]
        extra = (num_seen,) if wide else ()
        bs = config.eval.batch_size
        scores = train.run_batched(apply, variables, eval_state, x, bs, *extra)
        scores = scores[seen] if wide else scores
        y = data.y_test[seen]
        row = evaluate.evaluate_phase(
            scores, y, protocol, phase, test_phase=test_phase, task_labels=task
        )
        if counts:
            row["confusion"] = confusion_now(scores, y, test_phase, protocol, phase, task=task)
        return row

    row = rows("predict", method.predict, counts=confusion)
    if not extras:
        return row
    extra = {name: rows(name, fn) for name, fn in method.extra_predictions().items()}
    info = phase_info(protocol, phase)
    for name, (backbone, companion) in method.companions(info, variables, method_state).items():
        other = phase_model(config, method, info, final=True, backbone=backbone)
        extra[name] = rows(name, method.predict, other, companion)
    return {**row, "extra": extra} if extra else row


def confusion_now(scores, y, test_phase, protocol: Protocol, phase: int, *, task: bool):
    """The confusion matrix of the examples learned by `phase` (not the domains still to come);
    in the task scenario of their predictions among their task's classes, as the headline's."""
    now = slice(None) if test_phase is None else test_phase <= phase
    scores, y = scores[now], y[now]
    if task:  # the task label given
        pred = evaluate.task_aware_predictions(scores, protocol.phase_of(y), protocol)
    else:
        pred = scores.argmax(axis=1)
    return evaluate.confusion(pred, y, protocol.num_seen(phase))


def learned_test(data: RunData, protocol: Protocol, phase: int) -> np.ndarray:
    """Which test examples show what the run has learned by `phase`: those of the seen classes, and
    in the domain scenario those of the domains learned so far (the later ones only wait)."""
    learned = data.y_test < protocol.num_seen(phase)
    if data.test_arrival is not None:
        learned &= data.test_arrival <= phase
    return learned
