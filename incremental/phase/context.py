"""What the method's host-side hooks see of a phase: `methods.PhaseContext`, built for a model."""

from __future__ import annotations

import functools

from incremental import train
from incremental.data import device
from incremental.methods import PhaseContext, PhaseInfo
from incremental.phase import fit
from incremental.phase.load import RunData
from incremental.phase.model import dtype_of


def make_context(config, data: RunData, info: PhaseInfo, model, final_model=None) -> PhaseContext:
    """The context of the hooks of `info`'s phase, applying `model`.

    `final_model` is the model the phase ends with (when a method's `compress` changes the shape),
    the one the `fit` service trains; `model` when not given.
    """
    dtype = dtype_of(config)
    embed = train.make_apply_batches(model, data.norm, lambda out, _: out.features, dtype)
    return PhaseContext(
        info,
        data.y_train,
        data.x_train,
        lambda v, x: train.run_batched(embed, v, {}, x, config.eval.batch_size),
        apply_fn=functools.partial(train.apply_any_head, model),
        normalize=functools.partial(device.normalize, norm=data.norm, dtype=dtype),
        seed=config.seed,
        config=config,
        fit=fit.make_fit(config, data, info, final_model or model),
    )
