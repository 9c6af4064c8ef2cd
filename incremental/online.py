"""Online learning (`protocol.online`): one pass over each phase's stream in small batches, each
example seen once; evaluation at phase ends and, optionally, every N steps; blurry boundaries.

What it changes, and where:

- Each phase trains one epoch (`check` refuses other `train.epochs` / `train_first.epochs`): its
  stream is its examples in a seeded random order (the epoch's permutation, `device.batch_indices`)
  in batches of `train.batch_size` (10 in `configs/online_*.py`), the last one padded and masked,
  so each example is used exactly once. The stream batch size is the train batch size: one key.
- Online accuracy: each batch's accuracy before the update that it brings, from the forward pass
  of the train step itself (its `accuracy` metric), so it costs nothing. `results` reports it per
  phase (`online_accuracy`, the mean over the phase's batches: the phase's `final_train_accuracy`)
  and over the run (`average_online_accuracy`, the mean over every batch), as the average online
  accuracy of Cai, Sener & Koltun 2021 ("Online Continual Learning with Natural Distribution
  Shifts", ICCV). It is measured on the batch as trained: augmented when augmentation is on, with
  BatchNorm in training mode.
- `protocol.eval_every_steps = N`: the model as it trains is scored on the seen classes' test data
  every N steps of a phase (`StepEvaluations`, kept in the phase's record as `step_evaluations`),
  besides the phase end's evaluation. Only the method's `predict` is scored, with the method state
  it has at that step (state made at phase ends, class means, is the previous phase's).
- `protocol.blurry = b`: blurry task boundaries, after Rainbow Memory's Blurry-M (Bang et al.
  2021, "Rainbow Memory: Continual Learning with a Memory of Diverse Samples", CVPR), where M% of a
  task's examples are of other tasks' classes. Here the head grows at phase boundaries, so a class
  cannot appear before its phase: a fraction b of each later phase's stream is of earlier phases'
  classes, taken from their phases (`blurry_arrival`); phase 0 has no blur. Koh et al. 2022's
  i-Blurry and Moon et al. 2023's Si-Blurry, where a class can appear first in any phase, need a
  head that grows when a class first appears, which this does not do.
- Methods that train on a phase's data again after its stream (a compression or calibration stage
  that trains) refuse online learning at validation (`Method.online_problem`, `check`); those that
  only read it again for statistics (a Fisher, class means, herding) run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from incremental.memory import STREAM_SELECTIONS
from incremental.methods import Method
from incremental.methods.rehearsal import Rehearsal

BLURRY = 0xB1  # folds the blurry split's seed out of the run's


def check(config, method: Method) -> None:
    """Raises a ValueError naming every online setting that the config or method cannot run."""
    protocol, problems = config.protocol, []
    if protocol.online:
        epochs = (config.train_first.epochs, config.train.epochs)
        if epochs != (1, 1):
            problems.append(
                "protocol.online trains one pass over each phase's stream: set "
                f"train_first.epochs=1 and train.epochs=1 (got {epochs[0]} and {epochs[1]})."
            )
        if problem := method.online_problem():
            problems.append(f"Method {method.name!r} cannot learn online: {problem}")
    selection = method.memory.selection if hasattr(method, "memory") else None
    if isinstance(method, Rehearsal) and selection in STREAM_SELECTIONS:
        problems.append(
            f"Method {method.name!r} picks its exemplars at phase ends; memory.selection="
            f"{selection!r} fills a memory as the stream arrives (der_pp, er_ace, agem: reservoir; "
            "gdumb: balanced). Use herding, random or closest_to_mean."
        )
    if protocol.blurry and isinstance(method, Rehearsal):
        problems.append(
            f"With protocol.blurry a class's examples arrive over several phases, and "
            f"{method.name!r} picks its exemplars from all of them at its class's phase end; use a "
            "method whose memory fills as the stream arrives (der_pp, er_ace, agem, gdumb)."
        )
    if protocol.eval_every_steps and getattr(method, "trains_at_evaluation", False):
        problems.append(
            f"Method {method.name!r} trains a model at each evaluation point; it is evaluated at "
            "phase ends only: set protocol.eval_every_steps=0."
        )
    if protocol.eval_every_steps and config.seeds:
        problems.append("protocol.eval_every_steps does not run with config.seeds; set one seed.")
    if problems:
        raise ValueError("\n".join(problems))


def blurry_arrival(arrival: np.ndarray, blurry: float, seed: int) -> np.ndarray:
    """The phase each training example arrives in, with blurry boundaries.

    From the last phase back, each phase p >= 1 takes round(b / (1 - b) * n_p) examples, drawn
    uniformly (seeded) from those of earlier phases still in their own phase, where n_p is what
    remains of its own: earlier classes are then about a fraction b of its stream. An example moves
    at most once, to a later phase.
    """
    rng = np.random.default_rng([seed, BLURRY])
    arrival = np.array(arrival)
    for phase in range(int(arrival.max(initial=0)), 0, -1):
        own = int((arrival == phase).sum())
        candidates = np.flatnonzero(arrival < phase)
        count = min(round(blurry / (1.0 - blurry) * own), len(candidates))
        arrival[rng.choice(candidates, size=count, replace=False)] = phase
    return arrival


def steps_per_call(config) -> int | None:
    """Steps per call of the jitted epoch: calls end at every within-phase checkpoint and every
    evaluation step; None: to the epoch's end."""
    every = [n for n in (config.checkpoint.every_steps, eval_every(config)) if n]
    return math.gcd(*every) if every else None


def checkpoint_due(config, step: int) -> bool:
    """Whether `checkpoint.every_steps` saves after a call that ended at `step`: after every call,
    unless evaluations cut the calls shorter."""
    every = config.checkpoint.every_steps
    return bool(every) and (steps_per_call(config) == every or step % every == 0)


def eval_every(config) -> int:
    return config.protocol.get("eval_every_steps", 0)


class StepEvaluations:
    """The fit stage's `on_call` that scores the model as it trains every `eval_every_steps` steps
    of a phase (not at its end, which the evaluate stage scores), into `steps.evaluations`.

    `evaluate(variables, method_state)` gives the evaluate stage's row; the entries keep its
    `accuracy` and `row`. An entry already there (a resumed phase) is not made again.
    """

    def __init__(self, every: int, evaluate: Callable[[dict, dict], dict]):
        self.every, self.evaluate = every, evaluate

    def __call__(self, steps, state, method_state, ended_epoch: bool) -> None:
        del ended_epoch
        step = steps.step
        if not self.every or step % self.every or step >= steps.total:
            return
        if any(entry["step"] == step for entry in steps.evaluations):
            return
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        row = self.evaluate(variables, method_state)
        steps.evaluations.append({"step": step, "accuracy": row["accuracy"], "row": row["row"]})


def results(config, records: list[dict]) -> dict:
    """results.json's online keys (none for an offline run): `online_accuracy` per phase and
    `average_online_accuracy` over every batch of the run (None where a phase took no step)."""
    if not config.protocol.get("online", False):
        return {}
    per_phase = [r.get("final_train_accuracy") for r in records]
    batches = [-(-r["num_train_examples"] // config.train.batch_size) for r in records]
    pairs = [(a, n) for a, n in zip(per_phase, batches, strict=True) if a is not None]
    total = sum(n for _, n in pairs)
    average = math.fsum(a * n for a, n in pairs) / total if total else None
    return {"online_accuracy": per_phase, "average_online_accuracy": average}
