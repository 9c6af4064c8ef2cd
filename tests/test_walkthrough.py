"""The README's "Add a class to your classifier", run as written (epochs shortened), so it cannot rot."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def walkthrough_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Add a class to your classifier", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.split("  #")[0] for line in block.replace("\\\n", " ").splitlines() if line]


@pytest.mark.slow  # five commands, each a process of its own
def test_the_readme_walkthrough_runs_and_predicts_the_new_class(tmp_path):
    commands = walkthrough_commands()
    assert [c.split()[1] for c in commands] == [
        "experiments/add_a_class.py", "run", "learn", "predict", "export"
    ]  # fmt: skip
    outputs = []
    for command in commands:
        args = shlex.split(command.replace("runs/walk", str(tmp_path / "walk")))
        if args[0] == "incremental":
            args = [sys.executable, "-m", "incremental.main", *args[1:]]
        else:
            args[0] = sys.executable
        if args[3:4] == ["run"]:
            args += ["--config.train.epochs=3", "--config.train_first.epochs=3"]
        env = {**os.environ, "COLUMNS": "250"}  # the table's rows on one line each
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, (command, proc.stdout + proc.stderr)
        outputs.append(proc.stdout)
    predicted = [line for line in outputs[3].splitlines() if ".png" in line]
    assert len(predicted) == len(os.listdir(tmp_path / "walk" / "new_class" / "test" / "three"))
    right = sum(line.split()[1] == "three" for line in predicted)
    assert right >= 0.8 * len(predicted)  # replay after 3 epochs names the new class
    assert sorted(os.listdir(tmp_path / "walk" / "exported")) == [
        "classes.json", "model.jax_exported", "preprocessing.json"
    ]  # fmt: skip
