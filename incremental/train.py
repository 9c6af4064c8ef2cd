"""Training: the train state, per-phase optimizers, and the jitted epoch (one `lax.scan` over batches)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from incremental import models, parallel, surgery
from incremental.data import device
from incremental.methods import Batch, Method, Outputs, PhaseInfo, PhaseSetup

PyTree = Any
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")
# `fold_in` tags of the two uses of a phase's training key.
ORDER, AUGMENT = 0, 1
LOOPS = ("scan", "steps")


class TrainState(NamedTuple):
    """Everything the train step updates; a plain pytree."""

    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    step: jax.Array  # steps taken in this phase


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
    steps compile once (`head.capacity`).
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
        tx = surgery.freeze(base, params, rules)
        if setup.freeze_old_columns and num_old:
            tx = optax.chain(tx, surgery.freeze_head_columns(num_old))
        return tx

    if dynamic:
        return optax.inject_hyperparams(rule)(learning_rate=hp.lr, weight_decay=hp.weight_decay)
    factory = lambda learning_rate: rule(learning_rate, hp.weight_decay)  # noqa: E731
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


def apply_any_head(model: nn.Module, variables: PyTree, x: jax.Array, **kwargs):
    """`model.apply` for variables whose head has any number of columns (a teacher's, say)."""
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    return model.clone(num_classes=num_classes).apply(variables, x, **kwargs)


class PhaseArgs(NamedTuple):
    """A phase as arrays, for a train epoch compiled once for every phase (`head.capacity`).

    The epoch then takes the whole training set, and trains on the rows `rows[:num_train]` of it;
    `rows` has a fixed length (the training set's), padded with zeros.
    """

    phase: jax.Array  # int32 scalars
    num_old: jax.Array
    num_new: jax.Array
    num_train: jax.Array
    rows: jax.Array  # (slots,) int32


def make_train_epoch(
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    method: Method,
    info: PhaseInfo | None,
    setup: PhaseSetup,
    norm: device.Normalizer,
    batch_size: int,
    crop_padding: int = 0,
    flip: bool = False,
    dtype=jnp.float32,
    steps_per_call: int | None = None,
    loop: str = "scan",
    batch_sharding: jax.sharding.Sharding | None = None,
    stream: Any = None,
    hyperparams: Callable | None = None,
) -> Callable:
    """Returns `train_epoch(state, method_state, x, y) -> (state, method_state, metrics)`, jitted.

    `x`, `y` are the phase's device-resident training arrays. Every batch is a function of
    `(state.rng, state.step)` alone: epoch `e = step // steps_per_epoch` is a permutation drawn from
    `fold_in(state.rng, ORDER, e)`, and step `s` augments with `fold_in(state.rng, AUGMENT, s)`. So
    the batches continue exactly from any saved `state`, and `state.rng` stays the phase's key.

    One call runs from `state.step` to the end of its epoch, or `steps_per_call` steps if that
    comes first, in one `lax.scan` of fixed length (steps past the epoch's end are skipped), so it
    compiles once. `metrics` hold each step's values, of which the first `steps` are real.

    `loop='steps'` runs the same steps as a Python loop over one jitted step instead: XLA:CPU runs
    convolution gradients many times slower inside a loop than outside one, so convolutional models
    train faster this way on CPU (see `scripts/benchmark.py`); elsewhere the scan is faster.

    `loop='stream'` takes the batches from `stream` (a `data.stream.StreamingBatches` over the
    phase's examples, read on the host and prefetched to the device) instead of gathering them from
    device-resident `x`, `y` (pass None): the same batches in the same order, for datasets that do
    not fit on the device.

    `batch_sharding` (`parallel.batch_sharding(mesh)`) shards each gathered batch over the devices
    of a mesh: with replicated state and data, XLA partitions the step (data parallelism).

    `hyperparams` (`phase_hyperparams(config)`, with `tx` from `make_optimizer(..., dynamic=True)`
    and `info=None`) makes one program for every phase (`head.capacity`): the function takes a
    fifth argument, the phase's `PhaseArgs`, and `x`, `y` are the whole training set. The model's
    head has a column for every class; the logits of classes not seen yet are masked out, the
    method's hooks get a `PhaseInfo` of traced counts, and the learning rate and weight decay are
    set at every step. The batches and numbers are those of the phase's own program.

    `state` is donated; `method_state` is not (it may hold a teacher the caller still needs).
    """
    if loop not in (*LOOPS, "stream"):
        raise ValueError(f"Unknown train loop {loop!r}; choose one of {LOOPS}.")
    if (loop == "stream") != (stream is not None):
        raise ValueError("loop='stream' and a `stream` of batches go together.")
    if hyperparams is not None and (stream is not None or info is not None):
        raise ValueError("A train epoch for every phase takes its phase as PhaseArgs (info=None).")

    def loss_fn(params, batch_stats, method_state, batch, args):
        variables = {"params": params, "batch_stats": batch_stats}
        if setup.train_batch_norm:
            (feats, logits), updates = model.apply(
                variables, batch.x, train=True, mutable=["batch_stats"]
            )
            batch_stats = updates.get("batch_stats", batch_stats)
        else:
            feats, logits = model.apply(variables, batch.x, train=False)
        phase_info = info
        if args is not None:
            phase_info = PhaseInfo(args.phase, args.num_old, args.num_new)
            logits = models.mask_unseen(logits, args.num_old + args.num_new)
        per_example, metrics = method.loss(
            Outputs(feats, logits),
            batch,
            params=params,
            method_state=method_state,
            info=phase_info,
            apply_fn=functools.partial(apply_any_head, model),
        )
        correct = (jnp.argmax(logits, -1) == batch.y).astype(jnp.float32)
        metrics = {**metrics, "accuracy": correct}
        total = batch.weight.sum()
        mean = lambda v: (v * batch.weight).sum() / total  # noqa: E731
        return mean(per_example), (batch_stats, jax.tree.map(mean, metrics))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one_step(state, method_state, x_all, y_all, idx_b, weight_b, args):
        rows = idx_b if args is None else args.rows[idx_b]
        return batch_step(state, method_state, x_all[rows], y_all[rows], weight_b, args)

    def batch_step(state, method_state, x, y, weight_b, args=None):
        aug_rng = jax.random.fold_in(jax.random.fold_in(state.rng, AUGMENT), state.step)
        if batch_sharding is not None:
            x, y, weight_b = jax.lax.with_sharding_constraint((x, y, weight_b), batch_sharding)
        if crop_padding or flip:
            x = device.augment(aug_rng, x, crop_padding=crop_padding, flip=flip)
        batch = Batch(device.normalize(x, norm, dtype), y, weight_b)
        (loss, (batch_stats, metrics)), grads = grad_fn(
            state.params, state.batch_stats, method_state, batch, args
        )
        opt_state = state.opt_state
        if args is not None:
            per_epoch = -(-args.num_train // batch_size)
            values = hyperparams(args.phase, state.step, per_epoch)
            opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **values})
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = method.post_update(optax.apply_updates(state.params, updates))
        method_state = method.step_update(
            method_state, params_before=state.params, params_after=params, grads=grads
        )
        new = TrainState(params, batch_stats, opt_state, state.rng, state.step + 1)
        return new, method_state, {"loss": loss, **metrics}

    def epoch_batches(state: TrainState, num_examples, slots: int):
        """The batches of `state.step`'s epoch, the step's position in it, and the epoch's length.

        `num_examples` may be traced; the permutation then has `slots` entries (see `PhaseArgs`).
        """
        per_epoch = -(-num_examples // batch_size)
        epoch, first = jnp.divmod(state.step, per_epoch)
        order_rng = jax.random.fold_in(jax.random.fold_in(state.rng, ORDER), epoch)
        idx, weight = device.batch_indices(order_rng, num_examples, batch_size, slots)
        return idx, weight, first, per_epoch

    def phase_size(x_all, args):
        """The phase's example count (traced under `PhaseArgs`) and its permutation's length."""
        if args is None:
            return x_all.shape[0], x_all.shape[0]
        return args.num_train, args.rows.shape[0]

    # The epoch's order is drawn once per call; each step picks its row of it.
    @jax.jit
    def epoch_order(state, x_all, args):
        return epoch_batches(state, *phase_size(x_all, args))[:2]

    @functools.partial(jax.jit, donate_argnames=("state",))
    def single_step(state, method_state, x_all, y_all, idx, weight, args):
        n, _ = phase_size(x_all, args)
        first = state.step % -(-n // batch_size)
        return one_step(state, method_state, x_all, y_all, idx[first], weight[first], args)

    streamed_step = jax.jit(batch_step, donate_argnames=("state",))

    def train_steps(state, method_state, x_all, y_all, args=None):
        if stream:
            per_epoch = stream.steps_per_epoch
        else:
            n = x_all.shape[0] if args is None else int(parallel.to_host(args.num_train))
            per_epoch = -(-n // batch_size)
        step = int(parallel.to_host(state.step))  # an explicit read: one scalar per call
        count = min(steps_per_call or per_epoch, per_epoch - step % per_epoch)
        metrics = []
        batches = stream.batches(state.rng, step) if stream else None
        order = None if stream else epoch_order(state, x_all, args)
        for _ in range(count):
            if stream:
                x, y, weight = next(batches)
                state, method_state, step_metrics = streamed_step(state, method_state, x, y, weight)
            else:
                step_args = (x_all, y_all, *order, args)
                state, method_state, step_metrics = single_step(state, method_state, *step_args)
            metrics.append(step_metrics)
        if batches is not None:
            batches.close()  # stops the host readers of the rest of the epoch
        metrics = jax.tree.map(lambda *values: jnp.stack(values), *metrics)
        return state, method_state, {**metrics, "steps": count}

    @functools.partial(jax.jit, donate_argnames=("state",))
    def train_epoch(state, method_state, x_all, y_all, args=None):
        idx, weight, first, per_epoch = epoch_batches(state, *phase_size(x_all, args))
        most = idx.shape[0]  # the epoch's length, or its longest under `PhaseArgs`
        length = min(steps_per_call or most, most)
        # Room for a call that starts late in the epoch; the rows past its end are never used.
        idx = jnp.pad(idx, ((0, length), (0, 0)))
        weight = jnp.pad(weight, ((0, length), (0, 0)))
        idx = jax.lax.dynamic_slice_in_dim(idx, first, length)
        weight = jax.lax.dynamic_slice_in_dim(weight, first, length)
        count = jnp.minimum(length, per_epoch - first)

        shapes = jax.eval_shape(
            one_step, state, method_state, x_all, y_all, idx[0], weight[0], args
        )
        no_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2])

        def step(carry, inputs):
            i, idx_b, weight_b = inputs
            state, method_state, metrics = jax.lax.cond(
                i < count,
                lambda s, m: one_step(s, m, x_all, y_all, idx_b, weight_b, args),
                lambda s, m: (s, m, no_metrics),
                *carry,
            )
            return (state, method_state), metrics

        inputs = (jnp.arange(length), idx, weight)
        (state, method_state), metrics = jax.lax.scan(step, (state, method_state), inputs)
        return state, method_state, {**metrics, "steps": count}

    return train_epoch if loop == "scan" else train_steps


def make_apply_batches(
    model: nn.Module,
    norm: device.Normalizer,
    fn: Callable[[Outputs, dict], jax.Array],
    dtype=jnp.float32,
    *,
    mask: bool = False,
) -> Callable:
    """Returns a jitted `(variables, method_state, x_NBx...) -> fn(outputs)` over batches with `lax.map`.

    `mask=True` (a head with a column for every class, `head.capacity`): the function takes a
    fourth argument, `num_seen`, and the scores of the classes from `num_seen` on are -inf (the
    logits before `fn`, and `fn`'s class scores after it).
    """

    @jax.jit
    def apply_batches(variables, method_state, x_batches, num_seen=None):
        def one(x):
            x = device.normalize(x, norm, dtype)
            feats, logits = apply_any_head(model, variables, x, train=False)
            logits = logits.astype(jnp.float32)
            if mask:
                logits = models.mask_unseen(logits, num_seen)
            scores = fn(Outputs(feats, logits), method_state)
            return models.mask_unseen(scores, num_seen) if mask else scores

        return jax.lax.map(one, x_batches)

    return apply_batches


def run_batched(
    apply_batches: Callable, variables, method_state, x: np.ndarray, batch_size: int, *args
):
    """Applies a `make_apply_batches` function to host data in fixed-size batches; returns numpy.

    `args` follow the batches (a masked function's `num_seen`).
    """
    batches, n = device.padded_batches(x, batch_size)
    mesh = parallel.mesh_of(variables)
    if mesh is not None and jax.process_count() > 1:  # every input must span the same processes
        batches = parallel.replicate(batches, mesh)
    out = parallel.to_host(apply_batches(variables, method_state, batches, *args))
    return out.reshape(-1, *out.shape[2:])[:n]
