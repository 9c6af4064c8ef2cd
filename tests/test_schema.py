"""The config schema: complete, in step with the registries, and every bad value refused by name."""

import dataclasses
import importlib
import os
import subprocess
import sys
import typing

import pytest

from incremental import methods, schema
from incremental.config import base_config
from incremental.methods import METHODS

CONFIGS = ("digits", "mnist1d", "cifar100", "imagenet100", "digits_task", "permuted_digits")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_of_every_config_is_in_the_schema_and_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert set(schema.flatten(config)) == set(schema.KEYS)
    schema.check(config)


def test_the_schemas_choices_are_the_registries():
    from incremental import memory, protocol, surgery, train
    from incremental.data import autoaugment, domains
    from incremental.phase.model import DTYPES

    choices = {k: set(spec.choices) for k, spec in schema.KEYS.items() if spec.choices}
    assert choices == {
        "dtype": set(DTYPES),
        "memory.selection": set(memory.SELECTIONS),
        "head.init": set(surgery.HEAD_INITS),
        "train.optimizer": set(train.OPTIMIZERS),
        "train.schedule": set(train.SCHEDULES),
        "train.loop": {"auto", *train.LOOPS},
        "augment.autoaugment": {"", *autoaugment.POLICIES},
        "protocol.scenario": set(protocol.SCENARIOS),
        "protocol.domains": set(domains.DOMAINS),
    }


def invalid_values(spec: schema.Key) -> list:
    """Values `spec` must refuse: another type, each bound crossed, a choice that is not one."""
    wrong_type = {int: "3", float: "0.1", bool: 1, str: 3, tuple: 3}[spec.kind]
    values = [wrong_type]
    if spec.choices:
        values.append("nonsense")
    for bound, step in ((spec.low, -1), (spec.above, 0), (spec.below, 0), (spec.high, 1)):
        if bound is not None:
            values.append(type(bound)(bound + step) if spec.kind is float else int(bound) + step)
    if spec.kind is float:
        values.append(float("nan"))
    if spec.items is int:
        values.append((1, "2"))
    return values


CASES = [(key, value) for key, spec in schema.KEYS.items() for value in invalid_values(spec)]


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_every_invalid_value_is_refused_naming_its_key(key, value):
    config = base_config().to_dict()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=rf"config\.{key} must be"):
        schema.check(config)


def test_a_run_with_a_bad_value_is_refused_before_its_work_directory_exists(tmp_path):
    from incremental import run as run_lib

    config = importlib.import_module("configs.digits").get_config()
    config.train_first.lr, config.checkpoint.keep = -1.0, 0
    with pytest.raises(ValueError, match=r"train_first\.lr must be > 0(.|\n)*checkpoint\.keep"):
        run_lib.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_unknown_keys_get_the_nearest_ones():
    assert "Did you mean config.train.epochs" in schema.check_override("train.epoch")
    assert schema.check_override("method_args.anything") is None  # the method checks its own
    assert schema.check_override("model.kwargs.depth") is None
    assert schema.check_override("train") is None  # a whole section
    with pytest.raises(ValueError, match="config.train.lrr is not a config key"):
        schema.check({**base_config().to_dict(), "train": {"lrr": 1}})


def test_the_table_lists_every_key_without_importing_jax():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, incremental.schema as s; print(s.table()); "
         "print('jax' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert all(f"`{key}`" in out for key in schema.KEYS)
    assert out.strip().endswith("False")


def test_the_readme_holds_the_schemas_table():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        assert schema.table() in f.read()


@pytest.mark.parametrize("rules", [(("[", True),), (("backbone/.*",),), (("x", "yes"),)])
def test_freeze_rules_are_pairs_of_a_compiling_regex_and_a_bool(rules):
    config = base_config().to_dict()
    config["train"]["freeze"] = rules
    with pytest.raises(ValueError, match=r"config\.train\.freeze (has a regex|must hold)"):
        schema.check(config)


@pytest.mark.parametrize(
    "key, text, bad",
    [
        ("seed", "abc", True),
        ("seed", "3", False),
        ("train.lr", "1e-3", False),
        ("train.lr", "fast", True),
        ("log.plot", "maybe", True),
        ("log.plot", "False", False),
        ("method_args.anything", "x", False),  # a key the config lacks: the method's own check
        ("method_args.strength", "1e-3", False),
        ("method_args.strength", "x", True),  # of a float the config holds
    ],
)
def test_a_command_line_value_that_cannot_be_its_keys_type_is_named(key, text, bad):
    kind = float if key == "method_args.strength" else None
    message = schema.check_override_value(key, text, kind)
    assert (message is not None) == bad
    if bad:
        assert message.startswith(f"config.{key} must be") and repr(text) in message


def _wrong_value(hint):
    """A value that no field annotated `hint` takes."""
    return 1 if hint is str else "x"


METHOD_FIELDS = [
    (name, field.name)
    for name, cls in sorted(METHODS.items())
    for field in dataclasses.fields(cls)
    if field.name != "memory"  # config.memory, checked by the schema
]


@pytest.mark.parametrize("method, field", METHOD_FIELDS)
def test_every_method_argument_of_the_wrong_type_is_refused_by_name(method, field):
    """`method_args` belong to each method (its dataclass fields): a value of the wrong type is
    refused naming `config.method_args.<field>` when the method is built, before any training;
    ranges are the method's own checks."""
    hint = typing.get_type_hints(METHODS[method])[field]
    with pytest.raises(ValueError, match=rf"config\.method_args\.{field} must be .* got "):
        methods.build(method, {field: _wrong_value(hint)})
    default = next(f for f in dataclasses.fields(METHODS[method]) if f.name == field).default
    if default is not dataclasses.MISSING:
        methods.build(method, {field: default})  # the default is of the declared type


def test_a_config_saved_before_keys_existed_compares_equal_at_their_defaults():
    """A work directory saved before `dataset.learned`, `log.tensorboard`, ... existed resumes:
    the keys it lacks are taken at their defaults (what it ran with) before the configs are
    compared, while a real difference is still found."""
    from incremental import checkpoint
    from incremental.config import with_defaults

    current = base_config().to_dict()
    saved = base_config().to_dict()
    del saved["dataset"]["learned"], saved["dataset"]["image_size"], saved["log"]
    saved["method_args"] = {"strength": 1.0}  # free-form: kept as saved, not merged
    assert checkpoint.config_diff(saved, current)  # without the defaults: refused
    assert with_defaults(saved)["method_args"] == {"strength": 1.0}
    saved["method_args"] = current["method_args"]
    assert checkpoint.config_diff(with_defaults(saved), current) == []
    saved["train"]["lr"] = 0.5
    assert checkpoint.config_diff(with_defaults(saved), current) == [
        f"train.lr: 0.5 -> {current['train']['lr']!r}"
    ]
