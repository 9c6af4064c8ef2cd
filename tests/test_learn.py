"""`incremental learn`: new data brought to a finished run as its next phase.

The data: digits 0..5 named c0..c5 (`base.npz`), and two new classes c6, c7 (`new.npz`) made of the
same images transposed (c6 from 0..2, c7 from 3..5). A learned run normalises its inputs with the
statistics of the run's own training set (its earlier phases were trained with them), and a run on
the union (`full.npz`) with the union's; the transposed copies have the base set's pixel values, so
the two statistics agree and the learned run must equal the run on the union bit for bit.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import digits
from incremental import learn, lock, methods, workdirs
from incremental import run as run_lib
from incremental.data import device, sources
from incremental.phase import load

ROOT = Path(__file__).resolve().parent.parent
NAMES = np.array([f"c{i}" for i in range(8)])


def save_npz(path, x_train, y_train, x_test, y_test, names):
    np.savez(
        path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names
    )
    return f"npz:{path}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """`{name: source name}` of the npz files (module doc), and `more`: more examples of c1, c2
    (their images flipped)."""
    root = tmp_path_factory.mktemp("data")
    digits_source = sources.load_source("digits")
    base = []
    for x, y in (
        (digits_source.x_train, digits_source.y_train),
        (digits_source.x_test, digits_source.y_test),
    ):
        keep = y < 6
        base += [x[keep], y[keep]]
    new = []
    for x, y in zip(base[::2], base[1::2], strict=True):
        new += [x.transpose(0, 2, 1, 3).copy(), (y >= 3).astype(np.int32)]
    full = [
        np.concatenate([b, n + 6 * (i % 2)]) for i, (b, n) in enumerate(zip(base, new, strict=True))
    ]
    more = []
    for x, y in zip(base[::2], base[1::2], strict=True):
        keep = (y == 1) | (y == 2)
        more += [x[keep][:, :, ::-1].copy(), (y[keep] - 1).astype(np.int32)]
    return {
        "base": save_npz(root / "base.npz", *base, NAMES[:6]),
        "new": save_npz(root / "new.npz", *new, NAMES[6:]),
        "full": save_npz(root / "full.npz", *full, NAMES),
        "more": save_npz(root / "more.npz", *more, NAMES[1:3]),
        "root": str(root),
    }


def small_config(method, name, phase_sizes="2,2,2", **head):
    config = digits.get_config(f"method={method}")
    config.train.epochs = config.train_first.epochs = 2
    config.log.progress = config.log.plot = False
    config.dataset.name = name
    config.protocol.class_order = "natural"
    config.protocol.phase_sizes = phase_sizes
    config.head.update(head)
    return config


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """For finetune and replay: the run on base.npz (A), A learning new.npz (B), and the run on the
    union with the new classes as its last phase (C)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("finetune", "replay"):
        a, b, c = (str(root / f"{method}-{w}") for w in "ABC")
        out[method, "A"] = (a, run_lib.run(small_config(method, data["base"]), a))
        out[method, "B"] = (b, learn.learn(a, data["new"], b))
        out[method, "C"] = (c, run_lib.run(small_config(method, data["full"], "2,2,2,2"), c))
    return out


def final_losses(results):
    return [p["final_loss"] for p in results["phases"]]


def read_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def listing(directory):
    """Every path under `directory` with its size and modification time (but the lock file)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + [f for f in files if f != lock.LOCK_FILE]:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), directory)] = (
                stat.st_size,
                stat.st_mtime_ns,
            )
    return out


def test_the_learned_and_the_union_runs_normalise_alike(data):
    """The precondition of the bit-for-bit test (module doc)."""
    base, full = (sources.load_source(data[k]) for k in ("base", "full"))
    a, b = (device.fit_normalizer(s.x_train, s.is_image) for s in (base, full))
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.std, b.std)


@pytest.mark.parametrize("method", ["finetune", "replay"])
def test_learning_new_classes_equals_a_run_that_had_them_as_its_last_phase(data, runs, method):
    (_, a), (_, b), (_, c) = (runs[method, w] for w in "ABC")
    assert b["accuracy_matrix"] == c["accuracy_matrix"]
    assert final_losses(b) == final_losses(c)
    assert b["task_aware_matrix"] == c["task_aware_matrix"]
    if method == "replay":
        assert b["nme_accuracy_matrix"] == c["nme_accuracy_matrix"]
    assert b["complete"] and b["class_order"] == c["class_order"] == list(range(8))
    assert b["class_names"] == list(NAMES) and b["phase_sizes"] == [2, 2, 2, 2]
    assert b["phases"][3]["num_train_examples"] == c["phases"][3]["num_train_examples"]
    assert list(b["config"]["dataset"]["learned"]) == [data["new"]]
    # Each phase keeps the fingerprint of the data it trained on; the new phase's is the union's.
    fingerprints = [p["data_fingerprint"] for p in b["phases"]]
    assert fingerprints[:3] == [p["data_fingerprint"] for p in a["phases"]]
    assert fingerprints[3] == c["phases"][3]["data_fingerprint"] != fingerprints[2]


def test_the_learned_directory_is_an_ordinary_work_directory(runs):
    out, b = runs["replay", "B"]
    history = read_json(out, workdirs.SURGERY_FILE)
    assert history[-1]["operation"] == "learn" and history[-1]["new_classes"] == ["c6", "c7"]
    assert history[-1]["known_classes"] == [] and history[-1]["head_capacity"] == 8
    # `incremental run --config=OUT/config.py --workdir=OUT` takes it (finished: nothing to train).
    spec = importlib.util.spec_from_file_location("learned_config", os.path.join(out, "config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    again = run_lib.run(module.get_config(), out)
    assert again["accuracy_matrix"] == b["accuracy_matrix"]
    doc = workdirs.evaluate(out)
    assert doc["accuracy"] == b["last_accuracy"]
    assert [e["name"] for e in doc["per_class"]] == list(NAMES)


def test_more_examples_of_known_classes_train_one_phase_on_the_same_head(data, runs, tmp_path):
    """Stage 2, on the learned run B: a phase with no new classes; the head keeps its 8 columns."""
    b_dir, b = runs["replay", "B"]
    out = str(tmp_path / "more")
    d = learn.learn(b_dir, data["more"], out)
    assert d["complete"] and d["phase_sizes"] == [2, 2, 2, 2, 0]
    assert d["class_order"] == b["class_order"] and d["num_phases"] == 5
    assert d["accuracy_matrix"][-1][-1] is None and None not in d["accuracy_matrix"][-1][:-1]
    assert d["new_accuracy"][-1] is None and d["forgetting"] is not None
    with np.load(data["more"].removeprefix("npz:")) as arrays:
        brought = len(arrays["y_train"])
    memory = 200  # replay's exemplars (memory.budget) of the 8 classes
    assert d["phases"][-1]["num_train_examples"] == brought + memory
    assert d["phases"][-1]["classes"] == [] and d["phases"][-1]["epochs"] == 2
    _, saved = workdirs.restore(out)
    assert saved.state["params"]["head"]["kernel"].shape[-1] == 8
    history = read_json(out, workdirs.SURGERY_FILE)
    assert history[-1]["known_classes"] == ["c1", "c2"] and history[-1]["new_classes"] == []
    # The earlier phases are scored again on the test data the new source adds to c1 and c2.
    assert d["accuracy_matrix"][:4] != b["accuracy_matrix"]
    # The inputs are normalised as the run's first phases were, not with the merged data's statistics.
    learned, first = (
        load.load_data(workdirs.load_config(w))[0] for w in (out, runs["replay", "A"][0])
    )
    np.testing.assert_array_equal(learned.norm.mean, first.norm.mean)
    np.testing.assert_array_equal(learned.norm.std, first.norm.std)
    merged = device.fit_normalizer(learned.x_train, learned.is_image)
    assert not np.array_equal(merged.mean, first.norm.mean)


def test_a_head_with_room_keeps_its_width_and_the_numbers(data, runs, tmp_path):
    """A run made with head.capacity=20 adds the classes in its columns: the same numbers."""
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    run_lib.run(small_config("finetune", data["base"], capacity=20), a)
    results = learn.learn(a, data["new"], b)
    assert results["accuracy_matrix"] == runs["finetune", "C"][1]["accuracy_matrix"]
    assert final_losses(results) == final_losses(runs["finetune", "C"][1])
    _, saved = workdirs.restore(b)
    assert saved.state["params"]["head"]["kernel"].shape[-1] == 20
    assert results["config"]["head"]["capacity"] == 20


def test_a_learn_stopped_in_its_phase_resumes_to_the_same_numbers(
    data, runs, tmp_path, monkeypatch
):
    a_dir, _ = runs["finetune", "A"]
    out = str(tmp_path / "stopped")
    within = run_lib.Within.after_call

    def preempted(self, steps, *args):  # SIGTERM in the new phase, after its first 2 steps
        self.preempt.requested = True
        return within(self, steps, *args)

    monkeypatch.setattr(run_lib.Within, "after_call", preempted)
    with pytest.raises(run_lib.Preempted, match="at step 2"):
        learn.learn(a_dir, data["new"], out, {"checkpoint.every_steps": "2"})
    monkeypatch.undo()
    assert read_json(out, "results.json")["complete"] is False
    results = learn.learn(a_dir, data["new"], out, {"checkpoint.every_steps": "2"})
    b = runs["finetune", "B"][1]
    assert results["accuracy_matrix"] == b["accuracy_matrix"]
    assert final_losses(results) == final_losses(b)


def test_a_learn_that_fails_while_writing_leaves_nothing(data, runs, tmp_path, monkeypatch):
    a_dir, _ = runs["finetune", "A"]
    out = str(tmp_path / "failed")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workdirs._Writer, "finish", fail)
    with pytest.raises(OSError):
        learn.learn(a_dir, data["new"], out)
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def bad_inputs(data, runs, root):
    """`(what, learn arguments, message)` of inputs refused before anything is written."""
    a_dir = runs["finetune", "A"][0]
    incomplete = os.path.join(root, "incomplete")
    shutil.copytree(a_dir, incomplete)
    shutil.rmtree(os.path.join(incomplete, "checkpoints", "phase", "2"))
    occupied = os.path.join(root, "occupied")
    os.makedirs(occupied)
    Path(occupied, "notes.txt").write_text("mine")
    x = np.zeros((0, 8, 8, 1), np.uint8)
    y = np.zeros((0,), np.int32)
    empty = save_npz(os.path.join(root, "empty.npz"), x, y, x, y, NAMES[6:7])
    x = np.zeros((4, 4, 4, 1), np.uint8)
    y = np.zeros((4,), np.int32)
    small = save_npz(os.path.join(root, "small.npz"), x, y, x, y, NAMES[6:7])
    out = os.path.join(root, "out")
    return [
        ("no examples", (a_dir, empty, out), "empty"),
        ("another shape", (a_dir, small, out), r"shape \(4, 4, 1\).*shape \(8, 8, 1\)"),
        ("incomplete run", (incomplete, data["new"], out), "not complete"),
        ("--out not empty", (a_dir, data["new"], occupied), "already exists and is not empty"),
        (
            "no new classes, loss over new ones",
            (a_dir, data["more"], out, {"method_args.loss_classes": "new"}),
            "loss_classes=seen",
        ),
        ("a fixed key", (a_dir, data["new"], out, {"model.name": "convnet"}), "cannot change"),
        ("an unknown key", (a_dir, data["new"], out, {"train.epoch": "3"}), "Did you mean"),
        ("a bad value", (a_dir, data["new"], out, {"train.epochs": "many"}), "train.epochs"),
    ]


def test_bad_inputs_are_refused_and_nothing_is_written(data, runs, tmp_path):
    a_dir = runs["finetune", "A"][0]
    files = listing(a_dir)
    for what, args, message in bad_inputs(data, runs, str(tmp_path)):
        before = listing(tmp_path)
        with pytest.raises(ValueError, match=message):
            learn.learn(*args)
        assert listing(tmp_path) == before, what
    with lock.hold(a_dir), pytest.raises(ValueError, match="in use by another process"):
        learn.learn(a_dir, data["new"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert listing(a_dir) == files  # the run learned from is read, never written


def test_methods_say_why_they_cannot_train_a_phase_without_new_classes():
    refusing = {
        name
        for name in methods.METHODS
        if methods.build(name, methods.default_args(name), None).learn_problem(0, True)
    }
    assert refusing == {
        "new_head_only", "ncm", "lwf", "ewc", "bic", "wa", "icarl", "lucir", "der", "memo", "foster",
        "l2p", "dualprompt", "coda_prompt", "ease",  # their loss masks the known classes' logits
    }  # fmt: skip
    mixed = set()
    for name in methods.METHODS:  # every method trains a phase that brings new classes
        method = methods.build(name, methods.default_args(name), None)
        assert method.learn_problem(2, False) is None
        if method.learn_problem(2, True):  # and examples of known ones
            mixed.add(name)
    assert mixed == {"ncm", "l2p", "dualprompt", "coda_prompt", "ease"}


def test_the_command_line_learns_and_refuses(data, runs, tmp_path):
    a_dir = runs["finetune", "A"][0]
    out = str(tmp_path / "cli")
    command = [sys.executable, "-m", "incremental.main", "learn", a_dir, f"--data={data['new']}"]
    done = subprocess.run(
        [*command, f"--out={out}", "--config.log.progress=True", "--config.log.plot=False"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accuracy (%) after each phase" in done.stdout and "phase 3" in done.stdout
    assert f"incremental run --config={out}/config.py --workdir={out}" in done.stdout
    refused = subprocess.run([*command, f"--out={a_dir}"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "error:" in refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr


def test_nothing_in_the_package_imports_learn():
    from test_imports import import_graph

    importers = [m for m, deps in import_graph().items() if "incremental.learn" in deps]
    assert importers == ["incremental.main"]
