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
MILESTONE_SLOTS = 4  # `phase_arrays` pads the milestones to a multiple of this
NEVER = 2**30  # a padded milestone: an epoch no run reaches


class PhaseHparams(NamedTuple):
    """The optimisation settings that may differ between phase 0 and later phases: numbers, or
    arrays (`phase_arrays`) where a program compiled once takes them as inputs."""

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
    (`head.capacity`) computes the same rates as one compiled for each phase; so may `hp.lr` and,
    for 'multistep', `hp.milestones` (`phase_arrays`), so runs that differ only in them share it.
    """
    if kind == "constant":
        return optax.constant_schedule(hp.lr)
    if kind == "multistep":
        by_epoch = multistep(hp.lr, hp.milestones, lr_decay)
        return lambda count: by_epoch(count // steps_per_epoch)
    if kind == "cosine":
        by_epoch = optax.cosine_decay_schedule(hp.lr, max(1, hp.epochs))
        return lambda count: by_epoch(count / steps_per_epoch)
    raise ValueError(f"Unknown schedule {kind!r}; choose one of {SCHEDULES}.")


def multistep(lr, milestones, lr_decay: float) -> optax.Schedule:
    """The rate by epoch: `lr` times `lr_decay` at each milestone, by optax's piecewise-constant
    schedule one milestone at a time, so that the milestones may be an array (sorted, padded with
    `NEVER`): each boundary multiplies the rate as optax's schedule of all of them does, bit for
    bit, and a `NEVER` one by exactly 1."""
    bounds = sorted(set(milestones)) if isinstance(milestones, tuple | list) else milestones

    def by_epoch(epoch):
        rate = lr
        for bound in bounds:
            rate = optax.piecewise_constant_schedule(rate, {0: lr_decay})(epoch - bound)
        return rate

    return by_epoch


def milestone_slots(config) -> int:
    """The length of `phase_arrays`' milestones: a multiple of `MILESTONE_SLOTS` that holds both
    sections' (one program serves configs with up to `MILESTONE_SLOTS` milestones)."""
    most = max(len(set(src.milestones)) for src in (config.train_first, config.train))
    return MILESTONE_SLOTS * max(1, -(-most // MILESTONE_SLOTS))


def phase_arrays(config, phase: int) -> PhaseHparams:
    """`phase_hparams` as arrays, inputs of a train program compiled once (`head.capacity`): the
    milestones sorted and padded with `NEVER` to `milestone_slots(config)`."""
    hp = phase_hparams(config, phase)
    bounds = sorted(set(hp.milestones))
    bounds += [NEVER] * (milestone_slots(config) - len(bounds))
    return PhaseHparams(
        jnp.asarray(hp.epochs, jnp.int32),
        jnp.asarray(hp.lr, jnp.float32),
        jnp.asarray(bounds, jnp.int32),
        jnp.asarray(hp.weight_decay, jnp.float32),
    )


def phase_hyperparams(config) -> Callable[[jax.Array, PhaseHparams, jax.Array, jax.Array], dict]:
    """`(phase, hp, step, steps_per_epoch) -> {'learning_rate', 'weight_decay'}`, all traced.

    The hyper-parameters of `make_optimizer(..., dynamic=True)` at a step of a phase whose settings
    are `hp` (`phase_arrays(config, phase)`), with the same values as `make_optimizer`'s own. The
    program depends on the config only through the schedule's kind, `lr_decay` and, for 'cosine'
    (whose length optax takes as a number), the sections' epochs.
    """
    kind, lr_decay = config.train.schedule, config.train.lr_decay
    epochs = [phase_hparams(config, phase).epochs for phase in (0, 1)]

    def hyperparams(phase, hp: PhaseHparams, step, steps_per_epoch):
        if kind == "cosine":
            first, later = (
                make_schedule(kind, hp._replace(epochs=e), steps_per_epoch, lr_decay)(step)
                for e in epochs
            )
            rate = jnp.where(phase == 0, first, later)
        else:
            rate = make_schedule(kind, hp, steps_per_epoch, lr_decay)(step)
        return {
            "learning_rate": jnp.asarray(rate, jnp.float32),
            "weight_decay": jnp.asarray(hp.weight_decay, jnp.float32),
        }

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
