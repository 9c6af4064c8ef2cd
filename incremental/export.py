"""A finished run's classifier as a self-contained artifact that JAX alone runs (no checkpoint, no
`incremental`).

    incremental export WORKDIR --out=DIR [--phase=P] [--classifier=NAME]

writes three files to DIR:

- `model.jax_exported`: the forward pass serialized with `jax.export`, from the run's stored inputs
  (uint8 images or float features, any batch size) through the normalisation and the model to the
  seen classes' scores, with the params and the method state inside as constants;
- `classes.json`: the seen classes in output column order, `{position, dataset_id, name}`;
- `preprocessing.json`: the input shape and dtype, the normaliser's constants (already applied inside
  the model: they are for reference), what the output is, and where it comes from.

The output is the classifier the run reports as its `accuracy` (`'head'`, the method's `predict`)
or an extra one by name; `preprocessing.json`'s `output.kind` says whether it is logits (softmax
gives probabilities) or other scores (`predict.SCORE_KINDS`). Loading it:

    import jax, json, numpy as np
    model = jax.export.deserialize(open("DIR/model.jax_exported", "rb").read())
    classes = json.load(open("DIR/classes.json"))
    scores = model.call(x)  # x: (batch, *input shape), the input dtype of preprocessing.json
    print([classes[i]["name"] for i in np.argmax(scores, axis=1)])

The program is lowered for CPU, CUDA and TPU (`PLATFORMS`); `Exported.call` picks the one it runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from incremental import capacity, models, workdirs
from incremental import predict as predict_lib
from incremental.data import device
from incremental.methods import Outputs, base
from incremental.phase.model import dtype_of
from incremental.train.step import apply_any_head

ARTIFACT_FILE = "model.jax_exported"
CLASSES_FILE = "classes.json"
PREPROCESSING_FILE = "preprocessing.json"
FORMAT = "incremental-export-1"
PLATFORMS = ("cpu", "cuda", "tpu")


def forward_fn(loaded: predict_lib.Loaded) -> Callable[[jax.Array], jax.Array]:
    """`x_Bx... -> scores_BxS` of stored inputs, with everything else (params, normaliser, method
    state) closed over as constants: the computation `predict.score` runs, one batch at a time."""
    rs, saved = loaded.rs, loaded.saved
    model = workdirs._model(rs, saved.phase)
    # Host copies: the constants of the exported program, wherever the run placed its arrays.
    variables = jax.device_get(
        {"params": saved.state["params"], "batch_stats": saved.state["batch_stats"]}
    )
    state = jax.device_get(base.select_state(saved.method_state, rs.method.eval_keys))
    norm, dtype, fn = rs.data.norm, dtype_of(rs.config), loaded.classifier.fn
    num_seen, wide = loaded.num_seen, capacity.width(rs.config) > 0

    def forward(x):
        feats, logits = apply_any_head(
            model, variables, device.normalize(x, norm, dtype), train=False
        )
        logits = logits.astype(jnp.float32)
        if wide:  # a column for every class: those not seen yet are masked as in the evaluation
            logits = models.mask_unseen(logits, num_seen)
        return fn(Outputs(feats, logits), state)[:, :num_seen]

    return forward


def serialize(loaded: predict_lib.Loaded) -> bytes:
    """The forward pass exported for any batch size (a symbolic batch dimension), serialized."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *loaded.example_shape), loaded.rs.data.x_train.dtype)
    exported = jax.export.export(jax.jit(forward_fn(loaded)), platforms=PLATFORMS)(spec)
    return bytes(exported.serialize())


def export(
    workdir: str, out: str, *, phase: int | None = None, classifier: str | None = None
) -> dict:
    """Writes the inference artifact of a run's final (or the given) phase to `out`.

    Args:
      workdir: the work directory of a complete run (every phase of its protocol saved).
      out: a new or empty directory for the artifact's three files.
      phase: export this saved phase instead of the last one (a run that stopped early).
      classifier: `'head'` (default: the classifier results.json reports as `accuracy`) or one of
        the method's extra classifiers (e.g. `'nme'`).

    Returns:
      The contents of `preprocessing.json`.

    Raises:
      ValueError: an `out` that exists and is not an empty directory, a run that is not complete
        (without `phase`), an unknown phase or classifier.
    """
    check_out(out)
    loaded = predict_lib.load(workdir, phase=phase, classifier=classifier)
    check_complete(workdir, loaded, phase)
    blob = serialize(loaded)
    doc = preprocessing(workdir, loaded)
    files = {ARTIFACT_FILE: blob, CLASSES_FILE: _json(loaded.classes)}
    _write(out, {**files, PREPROCESSING_FILE: _json(doc)})
    return doc


def check_out(out: str) -> None:
    """Refuses an `out` that is a file, or a directory that is not empty."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(
            f"--out {out} exists and is not an empty directory; the export would mix with what is "
            "there. Pick a new directory, or remove it first."
        )


def check_complete(workdir: str, loaded: predict_lib.Loaded, phase: int | None) -> None:
    """Refuses, unless a phase was asked for, a run whose last phase has no checkpoint."""
    num_phases = loaded.rs.protocol.num_phases
    if phase is None and loaded.saved.phase < num_phases - 1:
        saved = workdirs.saved_phases(workdir)
        raise ValueError(
            f"{workdir}'s run is not complete: it has saved phases {saved} of its {num_phases} "
            f"(0..{num_phases - 1}). Finish it (the same `incremental run` command with "
            f"--workdir={workdir} resumes it), or export a phase it has with --phase={saved[-1]}."
        )


def preprocessing(workdir: str, loaded: predict_lib.Loaded) -> dict:
    """What `preprocessing.json` says: the input, the normaliser, the output, the source."""
    rs, kind = loaded.rs, loaded.classifier.kind
    shape, dtype = loaded.example_shape, rs.data.x_train.dtype
    layout = {3: "NHWC", 1: "ND"}.get(len(shape), "N...")
    is_logits = kind == predict_lib.LOGITS
    return {
        "format": FORMAT,
        "input": {
            "shape": ["batch", *shape],
            "dtype": str(dtype),
            "layout": layout,
            "is_image": bool(rs.data.is_image),
            # The stored range (digits: 0..16, not 0..255): inputs are expected in it, unscaled.
            "training_range": [float(rs.data.x_train.min()), float(rs.data.x_train.max())],
        },
        "normalization": {
            "applied": "inside the model: (float32(x) - mean) / std, per "
            + ("channel" if rs.data.is_image else "feature"),
            "mean": np.asarray(rs.data.norm.mean).reshape(-1).tolist(),
            "std": np.asarray(rs.data.norm.std).reshape(-1).tolist(),
        },
        "output": {
            "shape": ["batch", loaded.num_seen],
            "dtype": "float32",
            "classifier": loaded.classifier.name,
            "kind": kind,
            "meaning": (
                "logits of the seen classes; softmax over them gives probabilities"
                if is_logits
                else f"{kind} per seen class (not logits); the highest is the prediction"
            ),
            "columns": f"class positions 0..{loaded.num_seen - 1}: {CLASSES_FILE}",
        },
        "source": {
            "workdir": os.path.abspath(workdir),
            "phase": loaded.saved.phase,
            "num_phases": rs.protocol.num_phases,
            "method": rs.config.method,
            "dataset": rs.config.dataset.name,
            "model": rs.config.model.name,
        },
        "platforms": list(PLATFORMS),
        "jax_version": jax.__version__,
    }


def _json(value) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _write(out: str, files: dict[str, bytes]) -> None:
    """Writes `files` to a sibling temporary directory, then renames it to `out`: an export that
    fails leaves nothing behind."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would stay with `out`
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        check_out(out)  # again: something may have appeared there meanwhile
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
