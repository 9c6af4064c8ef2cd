"""The phase's optimizer and learning-rate schedule, from `config.train` / `config.train_first`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from incremental import surgery
from incremental.methods import PhaseSetup

PyTree = Any
OPTIMIZERS = ("sgd", "adam", "adamw")
NUM_FROZEN = "num_frozen"  # a dynamic optimizer's number of frozen old head columns
SCHEDULES = ("multistep", "cosine", "constant")


class PhaseHparams(NamedTuple):
    """The optimisation settings that may differ between phase 0 and later phases."""

    epochs: int
    lr: float
    milestones: tuple[int, ...]
    weight_decay: float


def phase_hparams(config, phase: int) -> PhaseHparams:
    """`config.train_first` for phase 0, `config.train` for later phases."""
    src = config.train_first if phase == 0 else config.train
    return PhaseHparams(
        int(src.epochs), float(src.lr), tuple(src.milestones), float(src.weight_decay)
    )


def make_schedule(
    kind: str, hp: PhaseHparams, steps_per_epoch: int | jax.Array, lr_decay: float
) -> optax.Schedule:
    """Per-step learning rate: an optax schedule over epochs, read at `step / steps_per_epoch`.

    `steps_per_epoch` may be traced, so a program compiled once for phases of different lengths
    (`head.capacity`) computes the same rates as one compiled for each phase.
    """
    if kind == "constant":
        return optax.constant_schedule(hp.lr)
    if kind == "multistep":
        by_epoch = optax.piecewise_constant_schedule(hp.lr, {m: lr_decay for m in hp.milestones})
        return lambda count: by_epoch(count // steps_per_epoch)
    if kind == "cosine":
        by_epoch = optax.cosine_decay_schedule(hp.lr, max(1, hp.epochs))
        return lambda count: by_epoch(count / steps_per_epoch)
    raise ValueError(f"Unknown schedule {kind!r}; choose one of {SCHEDULES}.")


def phase_hyperparams(config) -> Callable[[jax.Array, jax.Array, jax.Array], dict]:
    """`(phase, step, steps_per_epoch) -> {'learning_rate', 'weight_decay'}`, all traced.

    The hyper-parameters of `make_optimizer(..., dynamic=True)` at a step of any phase: phase 0's
    from `config.train_first`, later phases' from `config.train`, with the same schedule values as
    `make_optimizer`'s own.
    """
    settings = [phase_hparams(config, phase) for phase in (0, 1)]

    def hyperparams(phase, step, steps_per_epoch):
        values = [
            {
                "learning_rate": make_schedule(
                    config.train.schedule, hp, steps_per_epoch, config.train.lr_decay
                )(step),
                "weight_decay": hp.weight_decay,
            }
            for hp in settings
        ]
        return jax.tree.map(
            lambda first, later: jnp.where(phase == 0, first, later).astype(jnp.float32), *values
        )

    return hyperparams


def make_optimizer(
    train_cfg,
    hp: PhaseHparams,
    steps_per_epoch: int,
    params: PyTree,
    setup: PhaseSetup,
    num_old: int,
    *,
    dynamic: bool = False,
) -> optax.GradientTransformation:
    """The phase's optimizer: base rule, weight decay, freezing, and the schedule as a hyper-parameter.

    Weight decay is coupled L2 (added to the gradient before momentum), as in PyTorch's SGD and Adam,
    so published settings carry over; `adamw` decouples it. The learning rate is injected, so carrying
    the optimizer state into the next phase restarts the schedule while keeping the moments.

    `dynamic=True` injects the learning rate and the weight decay as plain numbers, which the train
    step sets at every step (from `phase_hyperparams`): one optimizer for every phase of a run whose
    steps compile once (`head.capacity`). With `setup.freeze_old_columns` the number of frozen head
    columns is one too (`NUM_FROZEN`, which the step sets to the phase's `num_old`).
    """
    if train_cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {train_cfg.optimizer!r}; choose one of {OPTIMIZERS}.")
    schedule = make_schedule(train_cfg.schedule, hp, steps_per_epoch, train_cfg.lr_decay)
    rules = tuple(tuple(r) for r in train_cfg.freeze) + setup.freeze

    def rule(learning_rate, weight_decay):
        if train_cfg.optimizer == "adamw":
            base = optax.adamw(learning_rate, weight_decay=weight_decay)
        else:
            step_rule = (
                optax.sgd(
                    learning_rate, momentum=train_cfg.momentum or None, nesterov=train_cfg.nesterov
                )
                if train_cfg.optimizer == "sgd"
                else optax.adam(learning_rate)
            )
            base = optax.chain(optax.add_decayed_weights(weight_decay), step_rule)
        return surgery.freeze(base, params, rules)

    def frozen_rule(learning_rate, weight_decay, num_frozen):  # num_frozen: traced or static
        tx = rule(learning_rate, weight_decay)
        return optax.chain(tx, surgery.freeze_head_columns(num_frozen))

    if dynamic:
        hyper = dict(learning_rate=hp.lr, weight_decay=hp.weight_decay)
        if not setup.freeze_old_columns:
            return optax.inject_hyperparams(rule)(**hyper)
        # The step sets it to the phase's number of old classes.
        num_frozen = {NUM_FROZEN: jnp.asarray(num_old, jnp.int32)}
        return optax.inject_hyperparams(frozen_rule)(**hyper, **num_frozen)

    def factory(learning_rate):
        if setup.freeze_old_columns and num_old:
            return frozen_rule(learning_rate, hp.weight_decay, num_old)
        return rule(learning_rate, hp.weight_decay)

    return optax.inject_hyperparams(factory)(learning_rate=schedule)


def carry_opt_state(old: optax.OptState, fresh: optax.OptState, num_new: int):
    """The previous phase's optimizer state, widened for the new head columns, schedule restarted.

    Returns `None` when the two states do not have the same structure (the freeze rules changed), in
    which case the caller starts from `fresh`.
    """
    widened = surgery.widen_like(old, num_new)
    shapes = lambda t: jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), t)  # noqa: E731
    if jax.tree.structure(widened) != jax.tree.structure(fresh):
        return None
    if shapes(widened) != shapes(fresh):
        return None
    # The schedule's own step count lives in `hyperparams_states`; the fresh state's is zero.
    return widened._replace(
        count=jnp.zeros_like(widened.count), hyperparams_states=fresh.hyperparams_states
    )
