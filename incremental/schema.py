"""The config schema: every key of `config.base_config()` with its type and valid values, declared
once, and checked before anything is loaded, written or trained.

`check(config)` raises one `ValueError` that names every key whose value is of the wrong type or
out of range, and what it must be; `unknown(key)` is the message for a key that does not exist,
with the nearest ones. Names that a registry defines (`method`, `model.name`, `dataset.name`) are
checked by `phase.load.validate` against the registry, whose modules import JAX; this module does
not, so the command line checks the schema before paying for that import. `method_args` are each
method's dataclass fields, checked by the method (`methods.build`); `model.kwargs` go to the
backbone's constructor.

`python -m incremental.schema` prints the keys as a Markdown table.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
from typing import Any

FREE_FORM = ("method_args", "model.kwargs")  # sections whose keys the method or model defines


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its type, its valid values (a range or choices) and what it is for."""

    kind: type  # int, float, bool, str or tuple (a float key takes ints too)
    help: str
    low: float | None = None  # the smallest valid value
    above: float | None = None  # values must be greater than this
    below: float | None = None  # values must be smaller than this
    high: float | None = None  # the largest valid value
    choices: tuple[str, ...] = ()
    items: type | None = None  # the type of a tuple's items
    check: Any = None  # value -> what is wrong with it, or None (beyond type and range)

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this key, or None."""
        if not _is(value, self.kind):
            return f"must be {self.kind.__name__}, got {type(value).__name__} {value!r}"
        if self.items is not None and not all(_is(v, self.items) for v in value):
            return f"must be a tuple of {self.items.__name__}, got {value!r}"
        values = value if self.kind is tuple else (value,)
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
        if self.check is not None and (bad := self.check(value)):
            return bad
        for v in values if self.kind in (int, float, tuple) else ():
            if self.kind is not tuple and isinstance(v, float) and not math.isfinite(v):
                return f"must be finite, got {v}"
            if isinstance(v, int | float) and (bad := self._range_problem(v)):
                return f"{bad}, got {value!r}"
        return None

    def _range_problem(self, v: float) -> str | None:
        if self.low is not None and v < self.low:
            return f"must be >= {self.low}"
        if self.above is not None and v <= self.above:
            return f"must be > {self.above}"
        if self.below is not None and v >= self.below:
            return f"must be < {self.below}"
        if self.high is not None and v > self.high:
            return f"must be <= {self.high}"
        return None

    def describe(self) -> str:
        """The valid values in words, for the table."""
        if self.choices:
            return " | ".join(self.choices)
        bounds = [
            f"{op} {b:g}"
            for op, b in ((">=", self.low), (">", self.above), ("<", self.below), ("<=", self.high))
            if b is not None
        ]
        kind = f"tuple of {self.items.__name__}" if self.items else self.kind.__name__
        return f"{kind} {', '.join(bounds)}".strip()


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, tuple | list)
    return isinstance(value, kind)


def _freeze_rules(rules) -> str | None:
    """What is wrong with `train.freeze`, `((regex, frozen), ...)`, or None."""
    for rule in rules:
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[1], bool)):
            return f"must hold (regex, frozen) pairs, got {rule!r}"
        try:
            re.compile(rule[0])
        except (re.error, TypeError) as error:
            return f"has a regex that does not compile, {rule[0]!r} ({error})"
    return None


def _range_pair(value, above: float, high: float) -> str | None:
    """What is wrong with a (low, high) range inside (above, high], or None."""
    if len(value) != 2 or not above < value[0] <= value[1] <= high:
        return f"must be (low, high) with {above:g} < low <= high <= {high:g}, got {value!r}"
    return None


def _phase_keys(prefix: str, which: str) -> dict[str, Key]:
    return {
        f"{prefix}.lr": Key(float, f"learning rate of {which}", above=0),
        f"{prefix}.epochs": Key(int, f"epochs of {which}", low=0),
        f"{prefix}.milestones": Key(
            tuple, f"epochs of {which} at which multistep decays the lr", items=int
        ),
        f"{prefix}.weight_decay": Key(float, f"coupled L2 weight decay of {which}", low=0),
    }


KEYS: dict[str, Key] = {
    "seed": Key(int, "the run's seed (initialisation, batches, exemplar ties)", low=0),
    "seeds": Key(tuple, "several seeds in one vmapped program (empty: just seed)", items=int),
    "method": Key(str, "the method (incremental/methods; checked against the registry)"),
    "dtype": Key(str, "computation dtype of the backbone", choices=("float32", "bfloat16")),
    "compile_cache": Key(str, "persistent compilation cache: auto | a directory | '' (off)"),
    "parallel.devices": Key(int, "data-parallel over this many devices (0: all)", low=0),
    "parallel.shard_params": Key(bool, "split large parameters over the devices (FSDP-style)"),
    "parallel.shard_min_size": Key(int, "the smallest parameter that shard_params splits", low=1),
    "parallel.coordinator": Key(str, "host:port of process 0 (several hosts); '' for one"),
    "parallel.num_processes": Key(int, "processes of a multi-host run", low=1),
    "parallel.process_id": Key(int, "this process's index, below num_processes", low=0),
    "dataset.name": Key(str, "digits | mnist1d | tfds:NAME | npz:PATH | folder:PATH"),
    "dataset.data_dir": Key(str, "the tfds data directory ('' for tfds's default)"),
    "dataset.classes": Key(str, "keep some classes: '' (all) | seeded:K | 3,5,7"),
    "dataset.download": Key(bool, "let tfds download and prepare the dataset"),
    "dataset.stream": Key(bool, "stream training batches from the host"),
    "dataset.remap_labels": Key(bool, "npz: renumber the class ids present as 0..K-1"),
    "dataset.image_size": Key(
        int, "folder, tfds: resize images to this square side (0: native)", low=0
    ),
    "dataset.holdout": Key(
        float,
        "folder without train/, test/, tfds imagenet_r/_a: fraction of each class to test",
        above=0,
        below=1,
    ),
    "dataset.skip_bad_files": Key(bool, "folder: skip image files that cannot be decoded"),
    "dataset.validation": Key(
        float,
        "fraction of each class's training data evaluated instead of the test set",
        low=0,
        below=1,
    ),
    "dataset.learned": Key(
        tuple, "sources brought by `incremental learn`, one more phase each", items=str
    ),
    "protocol.class_order": Key(str, "seeded | natural | an explicit order 3,1,0,..."),
    "protocol.class_order_seed": Key(int, "the seed of the seeded class order", low=0),
    "protocol.init_classes": Key(int, "classes in phase 0 (0: as many as increment)", low=0),
    "protocol.increment": Key(int, "new classes in each later phase", low=0),
    "protocol.phase_sizes": Key(str, "explicit phase sizes 5,1,1,...; overrides the two above"),
    "protocol.scenario": Key(
        str,
        "what a phase brings: new classes, with the task label, or a domain",
        choices=("class", "task", "domain"),
    ),
    "protocol.domains": Key(
        str, "domain scenario: what each phase's inputs are", choices=("permute", "rotate", "split")
    ),
    "protocol.num_domains": Key(int, "domain scenario: phases (the first unchanged)", low=1),
    "protocol.domain_seed": Key(int, "domain scenario: the seed of the permutations", low=0),
    "protocol.online": Key(bool, "one pass over each phase's stream, each example seen once"),
    "protocol.eval_every_steps": Key(int, "also evaluate every this many steps (0: off)", low=0),
    "protocol.blurry": Key(
        float, "fraction of each later phase's stream from earlier phases' classes", low=0, below=1
    ),
    "memory.budget": Key(int, "total exemplars, split evenly over the seen classes", low=0),
    "memory.per_class": Key(int, "exemplars per class instead (0: use budget)", low=0),
    "memory.selection": Key(
        str,
        "how exemplars are chosen",
        choices=("herding", "random", "closest_to_mean", "reservoir", "balanced"),
    ),
    "model.name": Key(str, "the backbone (incremental/models; checked against the registry)"),
    "model.init_from": Key(
        str, "phase 0 from a classifier you have (.msgpack or orbax dir; '' none)"
    ),
    "model.pretrained": Key(
        str, "a ViT checkpoint as the backbone: .npz or timm .safetensors ('' none)"
    ),
    "head.init": Key(str, "new head columns", choices=("default", "zeros", "imprint")),
    "head.capacity": Key(int, "head width: -1 auto, 0 widen each phase, C columns", low=-1),
    "train.batch_size": Key(int, "training batch size", low=1),
    "train.optimizer": Key(str, "the optimizer", choices=("sgd", "adam", "adamw")),
    "train.momentum": Key(float, "SGD momentum (0: none)", low=0, below=1),
    "train.nesterov": Key(bool, "Nesterov momentum"),
    "train.schedule": Key(
        str, "learning-rate schedule", choices=("multistep", "cosine", "constant")
    ),
    "train.loop": Key(str, "the epoch's loop", choices=("auto", "scan", "steps")),
    **_phase_keys("train", "phases 1, 2, ..."),
    "train.lr_decay": Key(float, "multistep's factor at each milestone", above=0, high=1),
    "train.carry_opt_state": Key(bool, "keep optimizer moments across phases"),
    "train.freeze": Key(tuple, "((regex, frozen), ...) over parameter paths", check=_freeze_rules),
    **_phase_keys("train_first", "phase 0"),
    "augment.crop_padding": Key(int, "random crop after zero padding (0: off)", low=0),
    "augment.flip": Key(bool, "random horizontal flip"),
    "augment.brightness": Key(float, "ColorJitter brightness factor range (0: off)", low=0, high=1),
    "augment.cutout": Key(int, "side of the Cutout square (0: off)", low=0),
    "augment.autoaugment": Key(str, "AutoAugment policy ('': off)", choices=("", "cifar10")),
    "augment.resized_crop": Key(
        int, "RandomResizedCrop's output side, applied first (0: off)", low=0
    ),
    "augment.resized_crop_scale": Key(
        tuple,
        "RandomResizedCrop's (low, high) fraction of the area",
        items=float,
        check=lambda v: _range_pair(v, 0.0, 1.0),
        above=0,
        high=1,
    ),
    "augment.resized_crop_ratio": Key(
        tuple,
        "RandomResizedCrop's (low, high) width / height, drawn log-uniformly",
        items=float,
        check=lambda v: _range_pair(v, 0.0, math.inf),
        above=0,
    ),
    "eval.batch_size": Key(int, "evaluation batch size", low=1),
    "checkpoint.every_epochs": Key(int, "also save every this many epochs (0: phase ends)", low=0),
    "checkpoint.every_steps": Key(int, "also save every this many steps (0: off)", low=0),
    "checkpoint.keep": Key(int, "within-phase checkpoints kept", low=1),
    "log.progress": Key(bool, "progress bars"),
    "log.plot": Key(bool, "the accuracy plot in the work directory"),
    "log.tensorboard": Key(
        bool, "TensorBoard event files in WORKDIR/tensorboard (metrics.jsonl is always written)"
    ),
    "log.wandb": Key(str, "a Weights & Biases project to log to ('' for none; pip install wandb)"),
}


def flatten(config, prefix: str = "") -> dict[str, Any]:
    """Dotted keys and values of a ConfigDict (or dict), the free-form sections left out."""
    out = {}
    for name, value in config.items():
        key = f"{prefix}{name}"
        if key in FREE_FORM:
            continue
        if hasattr(value, "items"):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value
    return out


def check(config) -> None:
    """Raises `ValueError` naming every key of `config` that is unknown, of the wrong type or out
    of range, with what it must be."""
    values = flatten(config)
    problems = [unknown(k) for k in values if k not in KEYS]
    if missing := [k for k in KEYS if k not in values]:
        problems.append(
            f"config.{', config.'.join(missing[:5])}{' and more' if len(missing) > 5 else ''} "
            f"missing ({len(missing)} keys): a config file starts from "
            "incremental.config.base_config() (see configs/digits.py) and changes its values."
        )
    for key, spec in KEYS.items():
        if key in values and (problem := spec.problem(values[key])):
            problems.append(f"config.{key} {problem} ({spec.help}).")
    num, pid = values.get("parallel.num_processes", 1), values.get("parallel.process_id", 0)
    if isinstance(num, int) and isinstance(pid, int) and not 0 <= pid < max(num, 1):
        problems.append(f"config.parallel.process_id must be below num_processes={num}, got {pid}.")
    if problems:
        raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def unknown(key: str) -> str:
    """The message for a config key that does not exist, with the nearest existing ones."""
    near = difflib.get_close_matches(key, list(KEYS), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(f'config.{k}' for k in near)}?" if near else ""
    return f"config.{key} is not a config key.{hint} `python -m incremental.schema` lists them."


def check_override(key: str) -> str | None:
    """The message for `--config.KEY=...` when KEY cannot exist, or None."""
    if key in KEYS or any(key.startswith(f"{s}.") for s in FREE_FORM):
        return None
    if any(k.startswith(f"{key}.") for k in KEYS):  # a whole section
        return None
    return unknown(key)


def check_override_value(key: str, text: str, kind: type | None = None) -> str | None:
    """The message for `--config.KEY=TEXT` when TEXT cannot be KEY's type (absl would refuse it
    with a message that names no valid value), or None. `kind` is the type of a free-form key
    (a `method_args` value's), which the table does not hold."""
    spec = KEYS.get(key)
    kind = spec.kind if spec is not None else kind
    if kind is bool and text.lower() not in ("true", "false", "1", "0"):
        return (
            f"config.{key} must be true or false, got {text!r}{f' ({spec.help})' if spec else ''}."
        )
    try:
        if kind in (int, float):
            kind(text)
    except ValueError:
        if spec is None:
            return f"config.{key} must be {kind.__name__}, got {text!r}."
        return f"config.{key} must be {spec.describe()}, got {text!r} ({spec.help})."
    return None


def table() -> str:
    """The keys as a Markdown table."""
    rows = ["| key | valid values | what it is |", "|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731 -- a pipe would end the cell
    rows += [f"| `{k}` | {cell(s.describe())} | {cell(s.help)} |" for k, s in KEYS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
