"""What the method's host-side hooks see of a phase: `methods.PhaseContext`, built for a model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from incremental import train
from incremental.data import device
from incremental.methods import Method, PhaseContext, PhaseInfo
from incremental.phase import fit
from incremental.phase.load import RunData
from incremental.phase.model import dtype_of, phase_model


def make_context(config, data: RunData, info: PhaseInfo, method: Method, *, final: bool = False):
    """The `PhaseContext` of the hooks of `info`'s phase, applying the phase's model (the final
    model with `final=True`); its `fit` service trains the final model, or the model whose backbone
    it is given (`fit(..., backbone=...)`, FOSTER's student)."""
    dtype = dtype_of(config)
    model = phase_model(config, method, info, final=final)
    embed = train.make_apply_batches(model, data.norm, lambda out, _: out.features, dtype)

    def model_of(backbone: Callable[..., Any] | None):
        return phase_model(config, method, info, final=True, backbone=backbone)

    return PhaseContext(
        info,
        data.y_train,
        data.x_train,
        lambda v, x: train.run_batched(embed, v, {}, x, config.eval.batch_size),
        apply_fn=functools.partial(train.apply_any_head, model),
        normalize=functools.partial(device.normalize, norm=data.norm, dtype=dtype),
        seed=config.seed,
        config=config,
        fit=fit.make_fit(config, data, info, model_of),
        arrival=data.arrival,
    )
