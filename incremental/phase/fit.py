"""The train stage: a phase's epochs, and the `fit` service that hooks training on their own use.

`fit` runs the phase's steps with within-phase checkpoints and preemption; `Steps` counts them and
averages each epoch's metrics; `make_fit` builds the plain training loop that a method's hook (a
compression stage, say) gets in its context, so that no method imports the loop that calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import parallel, train
from incremental.data import device
from incremental.methods import Method, PhaseInfo, PhaseSetup
from incremental.phase.model import dtype_of, train_loop

PyTree = Any


class Steps:
    """Counts a phase's steps as the calls of `train_epoch` return, and averages each epoch's metrics.

    An epoch's mean is exactly rounded (`math.fsum`) over its steps, so it does not depend on how
    the epoch was split into calls; the values of an epoch that a checkpoint splits are carried in
    the checkpoint (`state_dict`), so a resumed run reports the same means as an uninterrupted one.
    """

    def __init__(self, phase: int, epochs: int, steps_per_epoch: int, saved: dict | None = None):
        self.phase, self.per_epoch = phase, steps_per_epoch
        self.total = epochs * steps_per_epoch
        saved = saved or {}
        self.step = int(saved.get("step", 0))
        self.values = {k: list(v) for k, v in saved.get("values", {}).items()}
        self.last_epoch = dict(saved.get("last_epoch", {}))  # the last finished epoch's means
        # Evaluations within the phase (`online.StepEvaluations`): {"step", "accuracy", "row"}.
        self.evaluations = list(saved.get("evaluations", []))
        self.call_start, self.call = self.step, {}  # the last call's steps and their values

    def remaining(self, state: train.TrainState) -> bool:
        step = int(parallel.to_host(state.step))
        if step != self.step:
            raise ValueError(f"The train state is at step {step}, expected {self.step}.")
        return self.step < self.total

    def add(self, metrics: dict) -> bool:
        """Takes one call's metrics; returns whether it ended an epoch (its means: `last_epoch`)."""
        metrics = parallel.to_host(metrics)
        n = int(metrics.pop("steps"))
        loss = np.asarray(metrics["loss"])[:n]
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"Non-finite loss {loss[~np.isfinite(loss)][0]} in phase {self.phase}, epoch "
                f"{self.step // self.per_epoch}, steps {self.step}-{self.step + n - 1}; lower the "
                "learning rate or check the data. Checkpoints saved before it are kept."
            )
        # The call's steps, for the metrics log: steps `call_start + 1, ...`.
        self.call_start, self.call = (
            self.step,
            {key: [float(v) for v in np.asarray(value)[:n]] for key, value in metrics.items()},
        )
        self.step += n
        for key, value in self.call.items():
            self.values.setdefault(key, []).extend(value)
        if self.step % self.per_epoch:
            return False
        self.last_epoch = {k: math.fsum(v) / len(v) for k, v in self.values.items()}
        self.values = {}
        return True

    @classmethod
    def of(cls, pr, saved: dict | None = None) -> Steps:
        """The steps of a `begin.PhaseRun`."""
        return cls(pr.info.phase, pr.epochs, pr.steps_per_epoch, saved)

    @property
    def epoch(self) -> int:
        """Epochs finished so far."""
        return self.step // self.per_epoch

    def state_dict(self) -> dict:
        state = {"step": self.step, "values": self.values, "last_epoch": self.last_epoch}
        return {**state, "evaluations": self.evaluations} if self.evaluations else state


def fit(pr, state, method_state, *, steps: Steps | None = None, on_call=None):
    """The phase's steps from `state` on; returns `(state, method_state, Steps)`.

    `on_call(steps, state, method_state)` runs after each call of the epoch function (checkpoints,
    preemption, progress); it may stop the phase by raising.
    """
    steps = steps or Steps.of(pr)
    while steps.remaining(state):
        state, method_state, metrics = pr.train_epoch(state, method_state, pr.x, pr.y)
        ended_epoch = steps.add(metrics)
        if on_call is not None:
            on_call(steps, state, method_state, ended_epoch)
    return state, method_state, steps


PLAIN = PhaseSetup()  # every parameter trains (as `tx` lets it), BatchNorm in train mode


def make_fit(config, data, info: PhaseInfo, model_of: Callable[[Callable | None], Any]):
    """The `fit` service of a phase's context: plain training of a model on the host's data.

    `fit(variables, *, method, tx, epochs, method_state, rng, rows, name, backbone=None) ->
    variables` trains `model_of(backbone)` (with `backbone=None` the phase's final model, else the
    one with that backbone, as `Method.companions` gives them; `setup.train_batch_norm=False` keeps
    BatchNorm in inference mode, freezing is `tx`'s) for `epochs` over the training rows
    `rows`, with `method`'s loss and `tx`, batches drawn from `rng` as the phase's own are, the
    phase's augmentation and the config's batch size. `name` names the stage in errors.
    """

    def fit_fn(variables, *, method: Method, tx: optax.GradientTransformation, epochs: int,
               method_state: dict, rng: jax.Array, rows: np.ndarray, name: str,
               backbone: Callable | None = None, setup: PhaseSetup = PLAIN) -> PyTree:  # fmt: skip
        train_epoch = train.make_train_epoch(
            model=model_of(backbone),
            tx=tx,
            method=method,
            info=info,
            setup=setup,
            norm=data.norm,
            batch_size=config.train.batch_size,
            augment=device.Augment.from_config(config.augment, data.is_image),
            dtype=dtype_of(config),
            loop=train_loop(config),
        )
        params = variables["params"]
        zero = jnp.zeros((), jnp.int32)
        state = train.TrainState(params, variables["batch_stats"], tx.init(params), rng, zero)
        mesh = parallel.mesh_of(params)
        if mesh is not None:  # where the phase placed the variables: one compile, not two
            state = parallel.onto(state, mesh)
        x, y = jax.device_put(data.x_train[rows]), jax.device_put(data.y_train[rows])
        steps = Steps(info.phase, epochs, -(-len(rows) // config.train.batch_size))
        while steps.remaining(state):
            try:
                state, _, metrics = train_epoch(state, method_state, x, y)
                steps.add(metrics)
            except FloatingPointError as error:
                raise FloatingPointError(f"{name}: {error}") from None
        return {"params": state.params, "batch_stats": state.batch_stats}

    return fit_fn
