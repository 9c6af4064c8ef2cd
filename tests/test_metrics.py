"""metrics.jsonl and the TensorBoard event files: every step once, in order, across a crash and resume."""

import io
import json
import os
import struct

import numpy as np
import pytest

from configs import digits
from incremental import metrics
from incremental import run as run_lib


def small_config():
    config = digits.get_config("method=lwf")
    config.train.epochs = config.train_first.epochs = 2
    config.protocol.init_classes, config.protocol.increment = 4, 3  # 3 phases
    config.checkpoint.every_steps = 3
    config.log.progress = config.log.plot = False
    return config


def lines(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def train_steps(workdir):
    """(phase, step, global_step, loss, kd) of every train line."""
    return [
        (m["phase"], m["step"], m["global_step"], m["loss"], m.get("kd"))
        for m in lines(workdir)
        if m["kind"] == "train"
    ]


def scalars(directory, tag):
    """The (step, value) pairs of `tag` in the event files under `directory`."""
    return [(step, v.simple_value) for step, v in summary_values(directory, tag)]


def summary_values(directory, tag):
    """The (step, Summary.Value) pairs of `tag` in the event files under `directory` (TFRecord
    framing: length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    found = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 16 + length
            found += [(event.step, v) for v in event.summary.value if v.tag == tag]
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("metrics") / "run")
    results = run_lib.run(small_config(), workdir)
    return workdir, results


def test_every_step_is_logged_once_with_the_methods_terms_and_each_evaluation(uninterrupted):
    workdir, results = uninterrupted
    steps = train_steps(workdir)
    assert [s[2] for s in steps] == list(range(1, len(steps) + 1))  # global steps 1, 2, ...
    for phase in range(3):
        mine = [s[1] for s in steps if s[0] == phase]
        assert mine == list(range(1, len(mine) + 1)) and mine
    assert all(s[4] is None for s in steps if s[0] == 0)  # no teacher in phase 0
    assert all(isinstance(s[4], float) for s in steps if s[0] > 0)  # LwF's distillation term
    evals = [m for m in lines(workdir) if m["kind"] == "eval"]
    assert [m["accuracy"] for m in evals] == results["accuracy"]
    assert [m["final_loss"] for m in evals] == [p["final_loss"] for p in results["phases"]]
    epochs = [m for m in lines(workdir) if m["kind"] == "epoch"]
    assert [(m["phase"], m["epoch"]) for m in epochs] == [(p, e) for p in range(3) for e in (1, 2)]
    last = [[m["loss"] for m in epochs if m["phase"] == p][-1] for p in range(3)]
    assert last == [p["final_loss"] for p in results["phases"]]
    assert any("examples_per_second" in m for m in lines(workdir))
    train = [m for m in lines(workdir) if m["kind"] == "train"]
    assert all(m["grad_norm"] > 0 for m in train)
    config = small_config()  # each phase starts at its configured learning rate
    firsts = [next(m["lr"] for m in train if m["phase"] == p) for p in range(3)]
    assert firsts == pytest.approx([config.train_first.lr, config.train.lr, config.train.lr])
    logged = scalars(os.path.join(workdir, metrics.TENSORBOARD_DIR), "train/loss")
    assert [(s[2], pytest.approx(s[3])) for s in steps] == logged
    accuracy = scalars(os.path.join(workdir, metrics.TENSORBOARD_DIR), "eval/accuracy")
    assert [v for _, v in accuracy] == pytest.approx(results["accuracy"])


def test_each_evaluation_logs_its_confusion_matrix_per_class_accuracy_and_an_image(uninterrupted):
    from PIL import Image

    workdir, results = uninterrupted
    evals = [m for m in lines(workdir) if m["kind"] == "eval"]
    for m, phase in zip(evals, results["phases"], strict=True):
        counts = np.array(m["confusion"])
        assert counts.shape == (phase["num_seen"],) * 2
        assert np.trace(counts) / counts.sum() == pytest.approx(phase["accuracy"])
        per_class = np.diag(counts) / counts.sum(axis=1)
        assert m["per_class_accuracy"] == pytest.approx(per_class.tolist())
        old = phase["num_seen"] - len(phase["classes"])  # rows in class order: old classes first
        if old:
            old_rows = counts[:old]
            assert np.trace(old_rows) / old_rows.sum() == pytest.approx(phase["old_accuracy"])
    images = summary_values(os.path.join(workdir, metrics.TENSORBOARD_DIR), "eval/confusion")
    assert [step for step, _ in images] == [m["global_step"] for m in evals]
    last = np.array(Image.open(io.BytesIO(images[-1][1].image.encoded_image_string)))
    num_seen = results["phases"][-1]["num_seen"]
    assert last.shape[0] == last.shape[1] >= 256 and last.shape[0] % num_seen == 0
    cell = last.shape[0] // num_seen  # each cell one colour: the row-normalised count
    expected = metrics.confusion_image(np.array(evals[-1]["confusion"]))
    assert np.array_equal(last[..., :3], expected) and np.array_equal(
        last[::cell, ::cell, :3], metrics.confusion_image(np.array(evals[-1]["confusion"]), 1)
    )


def test_a_crash_and_resume_log_each_step_once(uninterrupted, tmp_path, monkeypatch):
    """A process that dies after logging steps its checkpoint does not hold: the resumed run drops
    them and logs them again, so the file (and TensorBoard's view) equals an uninterrupted run's."""
    reference, _ = uninterrupted
    workdir = str(tmp_path / "run")
    train = metrics.MetricsLog.train
    calls = []

    def crash_after_logging(self, *args):
        train(self, *args)
        calls.append(args[0])
        if len(calls) == 9:  # in phase 1, after logging steps the next checkpoint would save
            raise RuntimeError("killed")

    monkeypatch.setattr(metrics.MetricsLog, "train", crash_after_logging)
    with pytest.raises(RuntimeError, match="killed"):
        run_lib.run(small_config(), workdir)
    assert calls[-1] == 1 and len(train_steps(workdir)) > 0
    monkeypatch.setattr(metrics.MetricsLog, "train", train)
    run_lib.run(small_config(), workdir)
    assert train_steps(workdir) == train_steps(reference)
    epochs = lambda w: [
        (m["phase"], m["epoch"], m["loss"]) for m in lines(w) if m["kind"] == "epoch"
    ]  # noqa: E731
    assert epochs(workdir) == epochs(reference)
    logged = scalars(os.path.join(workdir, metrics.TENSORBOARD_DIR), "train/loss")
    # TensorBoard keeps the purged events on disk and hides those at or after `purge_step`.
    assert [(step, pytest.approx(loss)) for _, _, step, loss, _ in train_steps(reference)] == [
        pair for pair in _purged(logged)
    ]


def _purged(events):
    """What TensorBoard shows: a later event at a step hides every earlier one from that step on."""
    shown = []
    for step, value in events:
        shown = [pair for pair in shown if pair[0] < step]
        shown.append((step, value))
    return shown


def test_weights_and_biases_gets_the_same_scalars_and_resumes_one_run(tmp_path, monkeypatch):
    """log.wandb=PROJECT: a W&B run whose id is the work directory's (the same after a resume),
    given the config and every scalar TensorBoard gets. (A stand-in module: wandb is optional.)"""
    import sys
    import types

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    image = lambda array: ("image", array.shape)  # noqa: E731
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=image))
    config = small_config()
    config.log.wandb, config.log.tensorboard = "my-project", False
    workdir = str(tmp_path / "run")
    run_lib.run(config, workdir, stop_after=0)
    run_lib.run(config, workdir)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["project"] == "my-project" and inits[0]["config"]["method"] == "lwf"
    logged = [(c[2], c[1]["train/loss"]) for c in calls if c[0] == "log" and "train/loss" in c[1]]
    assert logged == [(s[2], s[3]) for s in train_steps(workdir)]
    images = [c[1]["eval/confusion"] for c in calls if c[0] == "log" and "eval/confusion" in c[1]]
    assert [shape[0] for _, shape in images] == [-(-256 // n) * n for n in (4, 7, 10)]
    assert [c[0] for c in calls].count("finish") == 2
    assert not os.path.exists(os.path.join(workdir, metrics.TENSORBOARD_DIR))
