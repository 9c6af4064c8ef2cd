"""A finished run's classifier applied to new inputs: image files, folders of images, `.npz` arrays.

    incremental predict WORKDIR INPUT... [--top-k=3] [--phase=P] [--classifier=NAME]
                        [--format=table|json|csv]

The model is the one the run evaluates at the end of the phase (the newest saved, or `--phase`), and
only that phase's seen classes can be predicted. Inputs are what the run trained on, as stored:

- an image file (any format Pillow decodes) is read as grayscale (`L`) or RGB as the run's images
  have 1 or 3 channels, and resized (bilinear) to the run's height and width if it differs; its
  pixel values are used as they are (0-255), so a run whose data has another range (scikit-learn's
  digits: 0-16) wants images of that range;
- a folder stands for every image file under it (extensions `folder.IMAGE_EXTENSIONS`, hidden names
  skipped), sorted by path;
- an `.npz` holds an array `x` (or `x_test`) of shape (N, *example shape), named `PATH[i]`.

The classifier is the one the run reports as its `accuracy` (`'head'`: the method's `predict`, what
`phase.evaluate` scores) or one of the method's extra classifiers by name (`'nme'`...). Where its
scores are logits, the output gives probabilities (softmax over the seen classes); otherwise the raw
scores, with `kind` saying what they are (`SCORE_KINDS`). All inputs go through one jitted program, in
batches of `config.eval.batch_size` (the last one padded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from incremental import workdirs
from incremental.methods import Method, Outputs, analytic, base, bic, ncm, rehearsal, wa
from incremental.phase.record import RESULTS_FILE

LOGITS = "logits"  # scores whose softmax over the seen classes gives probabilities
# What a classifier's scores are, by its function; a function not listed gives plain "score".
SCORE_KINDS: dict[Callable, str] = {
    Method.predict: LOGITS,
    bic.BiC.predict: LOGITS,  # bias-corrected logits
    wa.WA.predict: LOGITS,  # the aligned head's logits
    wa.unaligned_scores: LOGITS,
    rehearsal.nme_scores: "negative nme distance",
    ncm.NCM.predict: "cosine similarity",
    analytic.Analytic.predict: "ridge regression score",
}


class Classifier(NamedTuple):
    """One of a method's classifiers: `'head'` (its `predict`) or an extra one."""

    name: str
    fn: Callable[[Outputs, dict], jax.Array]
    kind: str  # LOGITS or a SCORE_KINDS value: what its scores are


class Loaded(NamedTuple):
    """A saved phase of a work directory, ready to score inputs with one classifier."""

    rs: workdirs.RunSetup
    saved: workdirs.Saved
    classifier: Classifier
    classes: list[dict]  # each seen class in position order: position, dataset_id, name

    @property
    def num_seen(self) -> int:
        return len(self.classes)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.rs.data.x_train.shape[1:])


def score_kind(fn: Callable) -> str:
    """What the scores of classifier `fn` are (`SCORE_KINDS`); `'score'` for an unknown one."""
    return SCORE_KINDS.get(getattr(fn, "__func__", fn), "score")


def classifiers(method: Method) -> dict[str, Classifier]:
    """The method's classifiers by name: `'head'` (reported as `accuracy`), then its extra ones."""
    fns = {"head": method.predict, **method.extra_predictions()}
    return {name: Classifier(name, fn, score_kind(fn)) for name, fn in fns.items()}


def load(workdir: str, *, phase: int | None = None, classifier: str | None = None) -> Loaded:
    """The newest (or the given) saved phase of `workdir` with classifier `classifier` (or 'head')."""
    rs, saved = workdirs.restore(workdir, phase)
    available = classifiers(rs.method)
    name = classifier or "head"
    if name not in available:
        raise ValueError(
            f"{rs.config.method} has no classifier {name!r}; choose one of "
            f"{', '.join(available)} ('head' is the one results.json reports as accuracy)."
        )
    classes = seen_classes(workdir, rs, rs.protocol.num_seen(saved.phase))
    return Loaded(rs, saved, available[name], classes)


def seen_classes(workdir: str, rs: workdirs.RunSetup, num_seen: int) -> list[dict]:
    """Position, dataset class id (results.json's `class_order`) and name of the seen classes.

    Names come from results.json's `class_names` (indexed by class id), else from the data, else
    they are the ids as text.
    """
    path = os.path.join(workdir, RESULTS_FILE)
    names = None
    if os.path.exists(path):
        with open(path) as f:
            names = json.load(f).get("class_names")
    names = names or rs.protocol.class_names
    ids = [int(c) for c in rs.protocol.class_order[:num_seen]]
    return [
        {"position": p, "dataset_id": c, "name": str(c) if names is None else str(names[c])}
        for p, c in enumerate(ids)
    ]


def score(loaded: Loaded, x: np.ndarray) -> np.ndarray:
    """The classifier's scores (N, num_seen) of inputs `x` (N, *example shape), as stored.

    One jitted program for all of `x`, in batches of `config.eval.batch_size` (as the run evaluates).
    """
    rs, saved = loaded.rs, loaded.saved
    model = workdirs._model(rs, saved.phase)
    variables = {"params": saved.state["params"], "batch_stats": saved.state["batch_stats"]}
    state = base.select_state(saved.method_state, rs.method.eval_keys)
    fn = loaded.classifier.fn
    scores = workdirs._scores(rs, model, fn, variables, state, x, loaded.num_seen)
    return scores[:, : loaded.num_seen]  # a head.capacity head has a column for every class


def probabilities(logits_NxC: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = logits_NxC.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def predict(
    workdir: str,
    inputs: Sequence[str],
    *,
    top_k: int = 3,
    phase: int | None = None,
    classifier: str | None = None,
) -> list[dict]:
    """The `top_k` classes of each input, by a saved phase's classifier.

    Args:
      workdir: a work directory with at least one phase checkpoint.
      inputs: image files, folders of images and `.npz` files (see the module docstring).
      top_k: how many classes to give per input (at most the number of seen classes).
      phase: the phase whose model predicts (default: the newest saved); only its seen classes
        can be predicted.
      classifier: `'head'` (default: the classifier results.json reports as `accuracy`) or one of
        the method's extra classifiers (e.g. `'nme'`).

    Returns:
      One dict per input, in order: `input` (its path, or `PATH[i]` for an `.npz`), `phase`,
      `classifier`, `kind` (`'probability'`: softmax of the logits; else what the scores are, e.g.
      `'negative nme distance'`), and `top_k`: a list, best first, of `position` (in the class
      order), `dataset_id` (as in results.json's `class_order`), `name`, and `probability` or
      `score` as `kind` says.

    Raises:
      ValueError: a missing input, a file that is not an image, arrays of another shape than the
        run's examples, an unknown classifier or phase, or a `top_k` below 1.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    check_inputs(inputs)
    loaded = load(workdir, phase=phase, classifier=classifier)
    names, x = read_inputs(inputs, loaded)
    return ranked(loaded, names, score(loaded, x), top_k)


def ranked(loaded: Loaded, names: Sequence[str], scores_NxC: np.ndarray, top_k: int) -> list[dict]:
    """The `predict` dicts of scored inputs."""
    is_logits = loaded.classifier.kind == LOGITS
    values = probabilities(scores_NxC) if is_logits else scores_NxC.astype(np.float64)
    field = "probability" if is_logits else "score"
    # Ranked by the scores themselves (first column on ties), as the evaluation's argmax.
    order = np.argsort(-scores_NxC, axis=1, kind="stable")[:, :top_k]
    out = []
    for i, name in enumerate(names):
        best = [{**loaded.classes[p], field: float(values[i, p])} for p in order[i]]
        out.append(
            {
                "input": name,
                "phase": loaded.saved.phase,
                "classifier": loaded.classifier.name,
                "kind": "probability" if is_logits else loaded.classifier.kind,
                "top_k": best,
            }
        )
    return out


# Reading inputs.


def check_inputs(inputs: Sequence[str]) -> None:
    """Refuses no inputs, or one that does not exist, before the work directory is read."""
    if isinstance(inputs, str):
        raise TypeError(f"inputs is a list of paths, got the string {inputs!r}; pass [{inputs!r}].")
    if not inputs:
        raise ValueError("No inputs given: pass image files, folders of images or .npz files.")
    for path in inputs:
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder.")


def read_inputs(inputs: Sequence[str], loaded: Loaded) -> tuple[list[str], np.ndarray]:
    """The inputs' names and their examples (N, *example shape) in the run's stored dtype."""
    shape, dtype = loaded.example_shape, loaded.rs.data.x_train.dtype
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for path in inputs:
        if os.path.isdir(path):
            files = image_files(path)
            arrays += [decode_image(f, loaded)[None] for f in files]
            names += files
        elif path.lower().endswith(".npz"):
            x = npz_examples(path, shape, dtype)
            arrays.append(x)
            names += [f"{path}[{i}]" for i in range(len(x))]
        else:
            arrays.append(decode_image(path, loaded)[None])
            names.append(path)
    return names, np.concatenate(arrays)


def image_files(folder: str) -> list[str]:
    """Every image file under `folder` (its sub-folders too; hidden names skipped), sorted."""
    from incremental.data.folder import IMAGE_EXTENSIONS

    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, name)
            for name in files
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        ]
    if not found:
        raise ValueError(
            f"{folder} holds no image files (named *{' *'.join(IMAGE_EXTENSIONS)}); pass a folder "
            "of images, image files or an .npz."
        )
    return sorted(found)


def decode_image(path: str, loaded: Loaded) -> np.ndarray:
    """The image file at `path` as one example of the run: (H, W, C) uint8, C = 1 (L) or 3 (RGB)."""
    from PIL import Image

    shape, dtype = loaded.example_shape, loaded.rs.data.x_train.dtype
    if not loaded.rs.data.is_image or len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: this run's examples are arrays of shape {shape}, not grayscale or RGB images; "
            "give them in an .npz with an array x of shape (N, "
            f"{', '.join(map(str, shape))})."
        )
    if dtype != np.uint8:
        raise ValueError(
            f"{path}: this run's images are stored as {dtype}, not 8-bit pixels, so an image file "
            f"cannot be read the way they were; give an .npz with an array x of dtype {dtype}."
        )
    height, width, channels = shape
    try:
        with Image.open(path) as image:
            pixels = image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"{path} is not an image that Pillow can decode ({type(error).__name__}: {error}); "
            "give image files (PNG, JPEG, ...), folders of them, or an .npz with an array x."
        ) from None
    if pixels.size != (width, height):
        pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(pixels, np.uint8).reshape(shape)


def npz_examples(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array `x` (or `x_test`) of the .npz at `path`, checked against the run's examples."""
    try:
        arrays = np.load(path, allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):  # an .npy renamed
            raise ValueError("one array, not named arrays")
        with arrays:
            files = list(arrays.files)
            key = next((k for k in ("x", "x_test") if k in files), None)
            x = arrays[key] if key else None
    except (OSError, EOFError, ValueError) as error:  # not a zip of .npy arrays, or pickled ones
        raise ValueError(
            f"{path} cannot be read as an .npz of arrays ({type(error).__name__}: {error}); save "
            "the examples with np.savez(path, x=...)."
        ) from None
    if x is None:
        raise ValueError(
            f"{path} has no array x or x_test (it has {', '.join(files) or 'none'}); save the "
            f"examples as x, shape (N, {', '.join(map(str, shape))})."
        )
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{path}: {key} has shape {x.shape}, but this run's examples have shape {shape}; save "
            f"them as (N, {', '.join(map(str, shape))})."
        )
    return as_stored(x, dtype, f"{path}: {key}")


def as_stored(x: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """`x` in the run's stored dtype: floats for float data; integers in range for integer data."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if x.dtype.kind in "iuf" and dtype.kind == "f":
        return x.astype(dtype)
    if x.dtype.kind in "iu" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if x.size == 0 or (x.min() >= info.min and x.max() <= info.max):
            return x.astype(dtype)
    raise ValueError(
        f"{where} has dtype {x.dtype}, which does not convert to this run's {dtype} without "
        f"changing values; save the examples as {dtype}."
    )


# Presentation.


def rows(predictions: list[dict]) -> list[dict]:
    """One flat row per input and rank (for CSV): input, rank, name, dataset_id, position, kind,
    value."""
    out = []
    for entry in predictions:
        for rank, best in enumerate(entry["top_k"], 1):
            value = best.get("probability", best.get("score"))
            out.append(
                {
                    "input": entry["input"],
                    "rank": rank,
                    "name": best["name"],
                    "dataset_id": best["dataset_id"],
                    "position": best["position"],
                    "kind": entry["kind"],
                    "value": value,
                }
            )
    return out


def prediction_table(predictions: list[dict], title: str = ""):
    """A rich table of `predict`'s output: one row per input, its top classes best first."""
    from rich import box
    from rich.table import Table

    table = Table(title=title or None, box=box.SIMPLE)
    top_k = max((len(p["top_k"]) for p in predictions), default=0)
    table.add_column("input", overflow="fold")
    for rank in range(1, top_k + 1):
        table.add_column(f"#{rank}", justify="right")
    for entry in predictions:
        table.add_row(entry["input"], *(_cell(best) for best in entry["top_k"]))
    return table


def _cell(best: dict) -> str:
    label = best["name"]
    if label != str(best["dataset_id"]):
        label += f" ({best['dataset_id']})"
    if "probability" in best:
        return f"{label} {100 * best['probability']:.1f}%"
    return f"{label} {best['score']:.4g}"
