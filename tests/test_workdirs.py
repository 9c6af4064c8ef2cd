"""Evaluating and editing saved work directories: remove classes, graft, and the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from incremental import run as run_lib
from incremental import surgery, workdirs

ROOT = Path(__file__).resolve().parent.parent
# Class order of digits with seed 1993: [4, 2 | 7, 6 | 0, 3 | 5, 8 | 9, 1]; the source stops after
# phase 2, so 5, 8, 9, 1 are not learned yet.
REMOVED = [7, 0]  # one class of phase 1 and one of phase 2


def small_config(seed=0):
    config = digits.get_config("method=replay")
    config.seed = seed
    config.train.epochs = config.train_first.epochs = 2
    config.train.milestones = config.train_first.milestones = (1,)
    config.log.progress = config.log.plot = False
    return config


def listing(directory):
    """Every file and directory under `directory` with its size and modification time (but the
    lock, `.lock`, which every run takes)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + [f for f in files if f != ".lock"]:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("source") / "run")
    run_lib.run(small_config(), workdir, stop_after=2)
    return workdir


@pytest.fixture(scope="module")
def removed(source, tmp_path_factory):
    """`(before, record, out, after)`: the source evaluated, edited, and the edit evaluated."""
    before = workdirs.evaluate(source, predictions=True)
    files = listing(source)
    out = str(tmp_path_factory.mktemp("edited") / "out")
    record = workdirs.remove_classes(source, REMOVED, out)
    assert listing(source) == files  # the source is read, never written
    after = workdirs.evaluate(out, predictions=True)
    return before, record, out, after


def test_removed_classes_are_gone_and_no_other_prediction_changes(removed):
    (doc, old), record, _, (new_doc, new) = removed
    seen = {c["dataset_class"] for c in doc["per_class"]}
    assert seen == {4, 2, 7, 6, 0, 3}
    assert {c["dataset_class"] for c in new_doc["per_class"]} == seen - set(REMOVED)
    assert not np.isin(new["y"], REMOVED).any()
    kept = ~np.isin(old["y"], REMOVED)
    np.testing.assert_array_equal(new["y"], old["y"][kept])  # the same test examples, in order
    for name in ("head", "nme"):
        before, after = old[name][kept], new[name]
        was_removed = np.isin(before, REMOVED)
        # Only the examples whose prediction was a removed class can change, and they must.
        np.testing.assert_array_equal(after[~was_removed], before[~was_removed])
        assert not np.isin(after, REMOVED).any()
        key = "accuracy" if name == "head" else f"{name}_accuracy"
        old_acc = {c["dataset_class"]: c[key] for c in doc["per_class"]}
        for entry in new_doc["per_class"]:
            label = entry["dataset_class"]
            mine = new["y"] == label
            if not was_removed[mine].any():
                assert entry[key] == old_acc[label]
            assert entry[key] == np.mean(after[mine] == label)
    assert record["classes"] == sorted(REMOVED)
    assert record["class_ids"] == {"4": 3, "2": 1, "6": 5, "3": 2, "5": 4, "8": 6, "9": 7, "1": 0}


def test_edited_workdir_is_a_valid_run_that_resumes_and_continues(removed):
    _, record, out, (doc, _) = removed
    results = json.loads((Path(out) / "results.json").read_text())
    assert results["surgery"][-1]["operation"] == "remove_classes"
    assert results["phase_sizes"] == [2, 1, 1, 2, 2] and len(results["accuracy"]) == 3
    assert results["accuracy"][-1] == doc["accuracy"]
    assert results["nme_accuracy"][-1] == doc["extra"]["nme"]["accuracy"]
    config = workdirs.load_config(out)
    assert config.dataset.classes == "1,2,3,4,5,6,8,9"
    files = listing(out)
    again = run_lib.run(config, out, stop_after=2)  # everything there is done: nothing trains
    assert again["accuracy_matrix"] == results["accuracy_matrix"]
    assert listing(out) == files
    more = run_lib.run(config, out, stop_after=3)
    assert len(more["accuracy"]) == 4
    assert more["phases"][3]["classes"] == [4, 6]  # dataset classes 5 and 8, renumbered
    assert more["accuracy_matrix"][:3] == results["accuracy_matrix"]


def test_bad_removals_are_refused_and_write_nothing(source, tmp_path):
    out = tmp_path / "out"
    cases = [
        ([11], "Unknown class ids \\[11\\]"),
        ([3, 3], "repeated"),
        ([5, 2], "\\[5\\] have not been learned yet"),
        ([4, 2, 7, 6, 0, 3], "all 6 learned classes"),
        ([], "No classes"),
    ]
    for classes, message in cases:
        with pytest.raises(ValueError, match=message):
            workdirs.remove_classes(source, classes, str(out))
    with pytest.raises(TypeError, match="integer class ids"):
        workdirs.remove_classes(source, [2.5], str(out))
    with pytest.raises(ValueError, match="inside the source"):
        workdirs.remove_classes(source, [2], os.path.join(source, "edited"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no phase checkpoint"):
        workdirs.remove_classes(str(tmp_path / "empty"), [2], str(out))
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        workdirs.remove_classes(source, [2], str(out))
    assert os.listdir(out) == ["notes.txt"]


def test_a_killed_surgerys_temporary_directory_is_removed_by_the_next(source, tmp_path):
    """`out.tmp-<pid>` of a surgery that was killed (its process gone) does not outlive the next
    surgery to `out`; one whose process still runs is left alone."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale, live = tmp_path / f"out.tmp-{gone}", tmp_path / f"out.tmp-{os.getppid()}"
    for d in (stale, live):
        d.mkdir()
        (d / "half-written").write_text("x")
    workdirs.remove_classes(source, [2], str(tmp_path / "out"))
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "results.json").exists()


def test_a_graft_pattern_that_is_no_regex_is_named(source, tmp_path):
    with pytest.raises(ValueError, match=r"The pattern '\[bad' is not a regular expression"):
        workdirs.graft(source, "[bad", source, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_two_surgeries_cannot_write_one_output(source, tmp_path):
    """`--out`'s lock: a second surgery to the same output is refused, naming the holder, and
    writes nothing; the lock file is gone once a surgery ends."""
    from incremental import lock

    out = tmp_path / "out"
    with lock.hold_file(str(tmp_path / ".out.lock"), "--out", "wait"):
        with pytest.raises(ValueError, match=rf"--out {out} is in use by another process \(pid "):
            workdirs.remove_classes(source, [2], str(out))
        assert sorted(os.listdir(tmp_path)) == [".out.lock"]
    workdirs.remove_classes(source, [2], str(out))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_signal_during_surgery_stops_it_and_leaves_nothing(source, tmp_path, monkeypatch, capsys):
    """SIGTERM while a surgery writes: a one-line message, the signal's exit status, and neither
    the output nor its temporary copy left behind."""
    import signal

    from incremental.preemption import Interruptible

    saves = []

    def save_then_signal(self, *args):
        saves.append(args[1])
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(workdirs._Writer, "save", save_then_signal)
    with pytest.raises(SystemExit) as stopped, Interruptible():
        workdirs.remove_classes(source, [2], str(tmp_path / "out"))
    assert stopped.value.code == 128 + signal.SIGTERM and saves == [0]
    assert "SIGTERM: stopped; nothing was changed." in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


def test_a_work_directory_that_cannot_be_written_is_still_evaluated(source, caplog):
    """`evaluate` only reads: where it cannot write evaluation.json it warns and answers."""
    expected = workdirs.evaluate(source)
    blocker = os.path.join(source, workdirs.EVALUATION_FILE + ".tmp")
    os.mkdir(blocker)  # opening it for writing fails, as on a read-only disk
    try:
        assert workdirs.evaluate(source) == expected
    finally:
        os.rmdir(blocker)
    assert "evaluation.json not written (Is a directory)" in caplog.text


def test_method_state_edit_keeps_known_entries_and_refuses_unknown_ones():
    head = {"kernel": jnp.arange(12.0).reshape(2, 6), "bias": jnp.arange(6.0)}
    state = {
        "memory": {"indices": jnp.array([0, 5, 9]), "labels": jnp.array([0, 2, 5])},
        "class_means": jnp.arange(18.0).reshape(6, 3),
        "teacher": {"params": {"backbone": {"w": jnp.ones((6, 6))}, "head": head}},
        "bias": {"alpha": jnp.arange(6.0), "beta": jnp.zeros(6)},
        "old_head": head,  # FOSTER keeps the last head on its own
    }
    label_map = np.array([0, 1, -1, 2, 3, 4])
    index_map = np.array([0, 1, 2, -1, 3, 4, 5, 6, 7, 8])
    out = workdirs.edit_method_state(state, [2], 6, label_map=label_map, index_map=index_map)
    assert out["memory"]["labels"].tolist() == [0, 4] and out["memory"]["indices"].tolist() == [
        0,
        8,
    ]
    assert out["class_means"][:, 0].tolist() == [0.0, 3.0, 9.0, 12.0, 15.0]
    assert out["teacher"]["params"]["head"]["bias"].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]
    assert out["teacher"]["params"]["backbone"]["w"].shape == (6, 6)  # not a head: kept
    assert out["bias"]["alpha"].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]
    assert out["old_head"]["bias"].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]
    assert out["old_head"]["kernel"][1].tolist() == [6.0, 7.0, 9.0, 10.0, 11.0]
    unknown = {"projection": jnp.ones((4, 8)), "weight": jnp.ones((8, 6))}  # analytic's state
    with pytest.raises(ValueError, match="'weight' has shape \\(8, 6\\)"):
        workdirs.edit_method_state(unknown, [2], 6, label_map=label_map, index_map=index_map)


def test_graft_copies_the_matching_params_and_refuses_misfits(source, tmp_path):
    other = str(tmp_path / "other")
    config = small_config(seed=1)
    config.head.capacity = 0  # a head of phase 0's 2 columns, against the source's 10
    run_lib.run(config, other, stop_after=0)
    out = str(tmp_path / "grafted")
    record = workdirs.graft(source, "backbone/.*", other, out)
    assert record["paths"] and all(p.startswith("backbone/") for p in record["paths"])
    params = {name: _params(name) for name in (source, other, out)}
    for path in record["paths"]:
        np.testing.assert_array_equal(params[out][path], params[other][path])
    np.testing.assert_array_equal(params[out]["head/kernel"], params[source]["head/kernel"])
    results = json.loads((Path(out) / "results.json").read_text())
    assert results["accuracy"][-1] == workdirs.evaluate(out)["accuracy"]
    with pytest.raises(ValueError, match="head/kernel"):  # 2 columns there, 10 here
        workdirs.graft(source, "head/.*", other, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="matches no leaf path"):
        workdirs.graft(source, "trunk/.*", other, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def _params(workdir):
    _, saved = workdirs.restore(workdir)
    return surgery.select(saved.state["params"], ".*")


def test_command_line_removes_a_whole_phase_and_evaluates(source, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "incremental.main", "surgery", source, "--remove-classes=4,2"]
    proc = subprocess.run(
        [*cmd, f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "removed classes [2, 4]" in proc.stdout and f"--config={out}/config.py" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["phase_sizes"] == [2, 2, 2, 2] and len(results["accuracy"]) == 2
    assert json.loads((out / "surgery.json").read_text())[0]["phases"] == {"0": 1, "1": 2}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert {c["dataset_class"] for c in evaluation["per_class"]} == {7, 6, 0, 3}
    again = subprocess.run([*cmd, f"--out={out}"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stdout
