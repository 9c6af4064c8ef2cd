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
from incremental.train.optim import NUM_FROZEN
from incremental.train.state import PhaseArgs, TrainState

PyTree = Any


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
        elif logits.shape[-1] > info.num_seen:  # a `head.capacity` head trained by `ctx.fit`
            logits = models.mask_unseen(logits, info.num_seen)
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

    return loss_fn


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
    and weight decay of the step come from `hyperparams(phase, step, steps_per_epoch)`, and the
    number of frozen old head columns (if the optimizer has one) is `args.num_old`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, method_state, x, y, weight_b, args: PhaseArgs | None = None):
        aug_rng = device.step_key(state.rng, state.step)
        if batch_sharding is not None:
            x, y, weight_b = jax.lax.with_sharding_constraint((x, y, weight_b), batch_sharding)
        if augment:
            x = device.augment(aug_rng, x, augment)
        batch = Batch(device.normalize(x, norm, dtype), y, weight_b)
        (loss, (batch_stats, metrics)), grads = grad_fn(
            state.params, state.batch_stats, method_state, batch, args
        )
        opt_state = state.opt_state
        if args is not None:
            per_epoch = -(-args.num_train // batch_size)
            values = hyperparams(args.phase, state.step, per_epoch)
            if NUM_FROZEN in opt_state.hyperparams:  # `PhaseSetup.freeze_old_columns`
                values[NUM_FROZEN] = args.num_old
            opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **values})
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = method.post_update(optax.apply_updates(state.params, updates))
        method_state = method.step_update(
            method_state, params_before=state.params, params_after=params, grads=grads
        )
        new = TrainState(params, batch_stats, opt_state, state.rng, state.step + 1)
        # For the metrics log: the step's learning rate and the gradient's global norm.
        extra = {"grad_norm": optax.global_norm(grads)}
        if "learning_rate" in getattr(opt_state, "hyperparams", {}):
            extra["lr"] = opt_state.hyperparams["learning_rate"]
        return new, method_state, {"loss": loss, **metrics, **extra}

    return step
