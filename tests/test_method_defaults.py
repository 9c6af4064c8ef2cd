"""incremental/method_defaults.py, the plain copy of the methods' defaults that config files read
without importing JAX, is the dataclasses' own."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from incremental import config as config_lib
from incremental import method_defaults, methods
from incremental.methods.finetune import Finetune

ROOT = Path(__file__).resolve().parent.parent


def test_the_table_is_every_methods_dataclass_defaults():
    builtin = sorted(
        name for name, cls in methods.METHODS.items() if cls.__module__.startswith("incremental.")
    )
    args = {name: methods.default_args(name) for name in builtin}
    selection = {
        name: memory.selection
        for name in builtin
        if (memory := methods.default_memory(name)) is not None
    }
    assert args == method_defaults.ARGS, f"write ARGS = {args!r} in incremental/method_defaults.py"
    assert selection == method_defaults.MEMORY_SELECTION, (
        f"write MEMORY_SELECTION = {selection!r} in incremental/method_defaults.py"
    )
    for name, values in args.items():  # the same types too: 1 == 1.0 == True in a dict compare
        assert [type(v) for v in method_defaults.ARGS[name].values()] == list(
            map(type, values.values())
        )


def test_a_config_file_loads_without_importing_jax():
    code = (
        "import json, sys; from configs import digits; "
        "c = digits.get_config('method=gdumb'); "
        "print(json.dumps([c.method_args.to_dict(), c.memory.selection, 'jax' in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [methods.default_args("gdumb"), "balanced", False]


def test_a_method_from_outside_the_package_gets_its_defaults_from_its_class():
    @dataclasses.dataclass(frozen=True)
    class Mine(Finetune):
        name = "mine_for_the_defaults_test"
        sharpness: float = 3.0

    methods.register(Mine)
    try:
        config = config_lib.base_config()
        config_lib.set_method(config, Mine.name)
        assert config.method_args.to_dict() == {"loss_classes": "seen", "sharpness": 3.0}
    finally:
        del methods.METHODS[Mine.name]
