"""The pure train step: `(state, method_state, x, y, weight, args) -> (state, method_state, metrics)`.

It knows nothing of where its batch came from (a gather from device-resident arrays, a host stream)
or what loop calls it (`train.loops`): those are composed around it by `train.make_train_epoch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from incremental import models
from incremental.data import device
from incremental.methods import Batch, Method, Outputs, PhaseInfo, PhaseSetup
from incremental.methods.base import train_kwargs
from incremental.train.optim import NUM_FROZEN
from incremental.train.state import PhaseArgs, TrainState

PyTree = Any
MEMORY = 0x4D454D  # folds a step's stream-memory key out of its augmentation key


def apply_any_head(model: nn.Module, variables: PyTree, x: jax.Array, **kwargs):
    """`model.apply` for variables whose head has any number of columns (a teacher's, say)."""
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    return model.clone(num_classes=num_classes).apply(variables, x, **kwargs)


def make_loss(model: nn.Module, method: Method, info: PhaseInfo | None, setup: PhaseSetup):
    """`loss(params, batch_stats, method_state, batch, args) -> (mean loss, (batch_stats, metrics))`.

    With `args` (a `PhaseArgs`, `head.capacity`) the method sees a `PhaseInfo` of traced counts and
    the logits of classes not seen yet are -inf; else it sees the static `info`.
    """

    def loss_fn(params, batch_stats, method_state, batch: Batch, args: PhaseArgs | None):
        variables = {"params": params, "batch_stats": batch_stats}
        joint = batch.memory is not None and method.forward_memory
        x = with_memory(batch) if joint else batch.x
        phase_info = info
        if args is not None:
            phase_info = PhaseInfo(args.phase, args.num_old, args.num_new)
        kwargs = train_kwargs(method, phase_info)
        if setup.train_batch_norm:
            (feats, logits), updates = model.apply(
                variables, x, train=True, mutable=["batch_stats"], **kwargs
            )
            batch_stats = updates.get("batch_stats", batch_stats)
        else:
            feats, logits = model.apply(variables, x, train=False, **kwargs)
        if args is not None:
            logits = models.mask_unseen(logits, args.num_old + args.num_new)
        elif logits.shape[-1] > info.num_seen:  # a `head.capacity` head trained by `ctx.fit`
            logits = models.mask_unseen(logits, info.num_seen)
        if joint:  # the memory's outputs to its minibatches, the rest to the batch
            feats, logits, batch = split_memory(feats, logits, batch)
        returned = logits  # every seen class's (what a stream memory keeps)
        if setup.task_offsets:  # the task scenario: each example's task label picks its block
            logits = models.mask_other_phases(logits, batch.y, setup.task_offsets)
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
        return mean(per_example), (batch_stats, jax.tree.map(mean, metrics), returned)

    return loss_fn


def with_memory(batch: Batch) -> jax.Array:
    """The batch's inputs followed by those of its memory minibatches: one forward pass for all."""
    return jnp.concatenate([batch.x, *(m.x for m in batch.memory.values())])


def split_memory(feats: jax.Array, logits: jax.Array, batch: Batch):
    """The outputs of `with_memory`'s inputs cut back: the batch's, and each minibatch's in its
    `out`; returns `(feats, logits, batch)`."""
    start, memory = batch.x.shape[0], {}
    for name, drawn in batch.memory.items():
        end = start + drawn.x.shape[0]
        memory[name] = drawn._replace(out=Outputs(feats[start:end], logits[start:end]))
        start = end
    n = batch.x.shape[0]
    return feats[:n], logits[:n], batch._replace(memory=memory)


def draw_memory(method: Method, method_state, key, batch_size: int, prepare: Callable):
    """The method's memory minibatches for a step (`Method.draw_memory`), their inputs prepared
    (`prepare(key, x)`: augmented, normalised) as the batch's are; None when it draws none."""
    drawn = method.draw_memory(method_state, jax.random.fold_in(key, 1), batch_size)
    if not drawn:
        return None
    return {
        name: m._replace(x=prepare(jax.random.fold_in(key, 3 + i), m.x))
        for i, (name, m) in enumerate(drawn.items())
    }


def phase_hyperparams(opt_state, args: PhaseArgs, hyperparams: Callable, step, batch_size: int):
    """`opt_state` with the step's learning rate and weight decay from `hyperparams` (and the number
    of frozen old head columns, where the optimizer has one) for the phase in `args`."""
    per_epoch = -(-args.num_train // batch_size)
    values = hyperparams(args.phase, args.hparams, step, per_epoch)
    if NUM_FROZEN in opt_state.hyperparams:  # `PhaseSetup.freeze_old_columns`
        values[NUM_FROZEN] = args.num_old
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **values})


def make_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    method: Method,
    *,
    norm: device.Normalizer,
    batch_size: int,
    augment: device.Augment = device.NO_AUGMENT,
    dtype=jnp.float32,
    batch_sharding: jax.sharding.Sharding | None = None,
    hyperparams: Callable | None = None,
) -> Callable:
    """One gradient step on a batch of stored inputs: augment, normalise, update, bookkeeping.

    The augmentation key is `device.step_key(state.rng, state.step)`. With `args` the learning rate
    and weight decay of the step come from `hyperparams(args.phase, args.hparams, step,
    steps_per_epoch)`, and the number of frozen old head columns (if the optimizer has one) is
    `args.num_old`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def prepare(key, x):
        x = device.augment(key, x, augment) if augment else x
        return device.normalize(x, norm, dtype)

    def step(state: TrainState, method_state, x, y, weight_b, args: PhaseArgs | None = None):
        aug_rng = device.step_key(state.rng, state.step)
        if batch_sharding is not None:
            x, y, weight_b = jax.lax.with_sharding_constraint((x, y, weight_b), batch_sharding)
        stored = Batch(x, y, weight_b)
        memory_key = jax.random.fold_in(aug_rng, MEMORY)
        memory = draw_memory(method, method_state, memory_key, x.shape[0], prepare)
        batch = Batch(prepare(aug_rng, x), y, weight_b, memory)
        (loss, (batch_stats, metrics, logits)), grads = grad_fn(
            state.params, state.batch_stats, method_state, batch, args
        )
        grad_of = lambda other: grad_fn(  # noqa: E731
            state.params, state.batch_stats, method_state, other, args
        )[1]
        grads = method.project_grads(grads, grad_of=grad_of, batch=batch)
        opt_state = state.opt_state
        if args is not None:
            opt_state = phase_hyperparams(opt_state, args, hyperparams, state.step, batch_size)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = method.post_update(optax.apply_updates(state.params, updates))
        method_state = method.step_update(
            method_state, params_before=state.params, params_after=params, grads=grads
        )
        observe_key = jax.random.fold_in(memory_key, 2)
        method_state = method.observe(method_state, stored, logits=logits, key=observe_key)
        new = TrainState(params, batch_stats, opt_state, state.rng, state.step + 1)
        # For the metrics log: the step's learning rate and the gradient's global norm.
        extra = {"grad_norm": optax.tree_utils.tree_norm(grads)}
        if "learning_rate" in getattr(opt_state, "hyperparams", {}):
            extra["lr"] = opt_state.hyperparams["learning_rate"]
        return new, method_state, {"loss": loss, **metrics, **extra}

    return step
