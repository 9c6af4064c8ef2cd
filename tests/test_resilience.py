"""Preemption, kills, damaged checkpoints and bad input: nothing finished is lost, numbers are exact."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import digits
from incremental import run as run_lib
from incremental import workdirs
from incremental.phase import begin, fit, load, save

ROOT = Path(__file__).resolve().parent.parent
# Short epochs, a checkpoint every 3 steps (and at epoch ends): every kill lands near one.
FLAGS = [
    "--config=configs/digits.py:method=replay",
    "--config.train.epochs=6",
    "--config.train_first.epochs=6",
    "--config.train.milestones=(4,)",
    "--config.train_first.milestones=(4,)",
    "--config.checkpoint.every_steps=3",
    "--config.log.plot=False",
]
NUMBERS = ("accuracy_matrix", "task_aware_matrix", "nme_accuracy_matrix", "accuracy")


def cli(workdir, *extra):
    cmd = [sys.executable, "-m", "incremental.main", "run", *FLAGS, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def numbers(workdir):
    with open(Path(workdir) / "results.json") as f:
        results = json.load(f)
    losses = [p["final_loss"] for p in results["phases"]]
    return {k: results[k] for k in NUMBERS} | {"losses": losses, "complete": results["complete"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("whole")
    proc = cli(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return numbers(workdir)


def wait_for_a_finished_phase(proc) -> bool:
    """Reads the CLI's output until it prints a phase's row; False if it ended first."""
    row = re.compile(r"^\s+\d+\s+\d+\s")  # "    2       6   97.1 ..." (phase, classes, ...)
    return any(row.match(line) for line in proc.stdout)


@pytest.mark.slow
def test_sigkill_at_many_points_loses_nothing(tmp_path, uninterrupted):
    """Kill -9 inside phase 0, then at several delays after each phase ends: during the phase-end
    save, the next phase's setup and compile, its first steps and its step checkpoints."""
    workdir = tmp_path / "killed"
    kills, finished_phases = 0, []
    for delay in (None, 0.0, 0.2, 0.5, 0.05, 0.3):
        proc = cli(workdir)
        if delay is None:
            time.sleep(3.0)  # the interpreter starts, then phase 0 compiles and trains
        elif not wait_for_a_finished_phase(proc):
            break
        else:
            time.sleep(delay)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        results = workdir / "results.json"
        if results.exists():
            done = len(json.loads(results.read_text())["accuracy_matrix"])
            assert done >= max(finished_phases, default=0)  # no finished phase is ever lost
            finished_phases.append(done)
    proc = cli(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert kills >= 4, kills
    assert numbers(workdir) == uninterrupted


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, uninterrupted):
    workdir = tmp_path / "term"
    proc = cli(workdir)
    for line in proc.stdout:  # wait until phase 1 is finished, then ask it to stop
        if line.startswith("    1 "):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out[-3000:]
    assert "Re-run to resume" in out and f"--workdir={workdir}" in out
    proc = cli(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "Resuming" in out
    assert numbers(workdir) == uninterrupted


@pytest.mark.slow
def test_signals_stop_seeds_runs_saved_and_a_second_signal_at_once(tmp_path):
    """config.seeds: SIGTERM stops after the phase in progress, saved (status 3), and the same
    command finishes it; a second SIGINT stops at once with status 130 and no traceback."""
    seeds_flags = ["--config.seeds=0,1", "--config.checkpoint.every_steps=0"]
    workdir = tmp_path / "seeds"
    proc = cli(workdir, *seeds_flags)
    first = workdir / "seed_1" / "results.json"
    while proc.poll() is None and not first.exists():  # phase 0 of every seed saved
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 3, out[-3000:]
    assert "Stopped before phase" in out and "Traceback" not in out
    out, _ = cli(workdir, *seeds_flags).communicate(timeout=600)
    assert json.loads((workdir / "results.json").read_text())["complete"], out[-3000:]

    proc = cli(tmp_path / "twice")
    for line in proc.stdout:  # interrupt once phase 1 is under way, again once that was heard
        if line.startswith("    0 "):
            # Phase 0's line comes before its checkpoint and the stop check after it: a signal at
            # once may stop the run there, before a second one can be sent. Phase 1 (compiling,
            # then 6 epochs) lasts seconds.
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
        if line.startswith("SIGINT: finishing"):  # a second signal before it would merge with it
            proc.send_signal(signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT again: stopping now" in out and "Traceback" not in out


def small_config(method="finetune"):
    config = digits.get_config(f"method={method}")
    config.train.epochs = config.train_first.epochs = 4
    config.train.milestones = config.train_first.milestones = (3,)
    config.checkpoint.every_epochs = 1
    config.log.progress = config.log.plot = False
    return config


@pytest.mark.parametrize("every_steps", [0, 3])
def test_resume_within_a_phase_is_exact(tmp_path, every_steps):
    """Whole epochs per call, or 3 steps per call: a run cut mid-phase ends bit-identical."""
    config = small_config()
    config.checkpoint.every_epochs = 0
    whole = run_lib.run(config, str(tmp_path / "whole"))
    config.checkpoint.every_steps = every_steps
    staged = str(tmp_path / "staged")
    run_lib.run(config, staged, stop_after=1)
    # Pretend the run died in phase 2 after three calls of the step.
    from incremental import capacity, checkpoint

    data, protocol, method = load.validate(config, staged)
    config = capacity.resolved(config, method, protocol.num_classes)  # as `run` saves it
    ckpts = checkpoint.Checkpoints(staged)
    _, carried, method_state, records = save.resume(ckpts, config, method, protocol, data)
    pr, state, method_state = begin.begin(config, method, data, protocol, 2, carried, method_state)
    steps = fit.Steps.of(pr)
    for _ in range(3):
        state, method_state, metrics = pr.train_epoch(state, method_state, pr.x, pr.y)
        steps.add(metrics)
    if every_steps:
        assert pr.steps_per_epoch == 5 and steps.step == 8  # calls of 3, 2 (epoch end), 3 steps
    else:
        assert steps.step == 3 * pr.steps_per_epoch
    assert int(state.step) == steps.step
    meta = save.meta(config, protocol, 2, records, steps.state_dict())
    ckpts.save_within(2, steps.step, state, method_state, meta)
    ckpts.wait()
    ckpts.close()
    resumed = run_lib.run(config, staged)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [p["final_loss"] for p in resumed["phases"]] == [
        p["final_loss"] for p in whole["phases"]
    ]


def test_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, capsys):
    config = small_config()
    config.checkpoint.every_epochs = 0
    whole = run_lib.run(config, str(tmp_path / "whole"))
    staged = tmp_path / "staged"
    run_lib.run(config, str(staged), stop_after=2)
    newest = staged / "checkpoints" / "phase" / "2"
    files = sorted((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as f:  # truncate the biggest array file to half
        f.truncate(files[-1].stat().st_size // 2)
    resumed = run_lib.run(config, str(staged))
    out = capsys.readouterr().out
    assert "cannot be read" in out and str(newest) in out
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert any((staged / "checkpoints" / "damaged").iterdir())  # kept aside, not deleted


def test_a_flipped_bit_in_a_saved_checkpoint_is_detected_not_restored(tmp_path):
    """A bit flipped anywhere in a phase checkpoint (arrays, their metadata, the meta JSON) either
    makes the restore fail, or changed nothing the restore returns: never other numbers. At least
    one flip is caught by the checksums alone (orbax itself reads such flips without complaint)."""
    import jax

    from incremental import checkpoint

    config = small_config()
    config.train.epochs = config.train_first.epochs = 1
    config.checkpoint.every_epochs = 0
    workdir = str(tmp_path / "run")
    run_lib.run(config, workdir, stop_after=0)
    rs, original = workdirs.restore(workdir, 0)
    target = save.state_target(rs.config, rs.method, rs.protocol, rs.data, 0)

    def restore():
        ckpts = checkpoint.Checkpoints(workdir)
        try:
            return ckpts.restore(0, target)
        finally:
            ckpts.close()

    files = sorted(p for p in (tmp_path / "run" / "checkpoints" / "phase" / "0").rglob("*"))
    files = [p for p in files if p.is_file()]
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "by_checksum": 0, "unchanged": 0}
    for path in files:
        data = path.read_bytes()
        for offset in rng.choice(len(data), size=min(6, len(data)), replace=False):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(flipped))
            try:
                state, method_state, meta = restore()
            except Exception as error:  # noqa: BLE001 -- any refusal will do
                outcomes["refused"] += 1
                outcomes["by_checksum"] += isinstance(error, checkpoint.DamagedCheckpoint)
            else:
                same = jax.tree.map(np.array_equal, dict(state), original.state)
                assert all(jax.tree.leaves(same)), f"{path.name}@{offset}: other numbers restored"
                assert meta == original.meta, f"{path.name}@{offset}: another meta restored"
                outcomes["unchanged"] += 1
            finally:
                path.write_bytes(data)
    assert outcomes["by_checksum"] > 0, outcomes
    # Every file restored intact again: the flips were undone.
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, dict(restore()[0]), original.state)))
    # `evaluate` reports no numbers from a checkpoint whose arrays changed since they were saved.
    meta_file = tmp_path / "run" / "checkpoints" / "phase" / "0" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["checksums"]["state/params/head/kernel"] ^= 1
    meta["checksums"]["meta"] = checkpoint._meta_checksum(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="changed on disk.*state/params/head/kernel"):
        workdirs.evaluate(workdir, phase=0)


def test_results_json_is_rewritten_from_the_checkpoints_when_it_is_damaged(tmp_path, capsys):
    """A finished run re-run: a results.json that does not parse, or whose numbers were edited,
    is written again from what the checkpoints recorded, with a warning; an intact one is left."""
    config = small_config()
    config.train.epochs = config.train_first.epochs = 1
    config.checkpoint.every_epochs = 0
    workdir = tmp_path / "run"
    whole = run_lib.run(config, str(workdir))
    path = workdir / "results.json"
    edited = {**whole, "last_accuracy": 1.0}
    for damage in ("{not json", json.dumps(edited)):
        path.write_text(damage)
        capsys.readouterr()
        again = run_lib.run(config, str(workdir))
        assert "rewrote it from the checkpoints" in capsys.readouterr().out
        assert json.loads(path.read_text())["last_accuracy"] == whole["last_accuracy"]
        assert again["accuracy_matrix"] == whole["accuracy_matrix"]
    before = path.stat().st_mtime_ns
    run_lib.run(config, str(workdir))
    assert "rewrote" not in capsys.readouterr().out and path.stat().st_mtime_ns == before


def test_changed_lr_is_refused_but_checkpoint_frequency_may_change(tmp_path):
    config = small_config()
    run_lib.run(config, str(tmp_path), stop_after=0)
    config.checkpoint.every_epochs = 3
    config.log.progress = True
    run_lib.run(config, str(tmp_path), stop_after=1)  # accepted
    config.train.lr = 0.5
    with pytest.raises(ValueError, match=r"train.lr: 0.05 -> 0.5"):
        run_lib.run(config, str(tmp_path))


def test_nonfinite_loss_names_phase_and_epoch_and_keeps_checkpoints(tmp_path):
    config = small_config()
    run_lib.run(config, str(tmp_path), stop_after=0)
    before = sorted(p.name for p in (tmp_path / "checkpoints" / "phase").iterdir())
    config2 = small_config()
    config2.train.lr = 1e30  # later phases diverge
    with pytest.raises(FloatingPointError, match="phase 1, epoch 0, steps 0-"):
        run_lib.run(config2, str(tmp_path / "other"))
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "phase").iterdir()) == before


SPARSE = np.array([3, 7, 100, 2_000_000_000])  # class ids with gaps, one far beyond the others


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(40, 5)).astype(np.float32),
        "y_train": np.arange(40) % 4,
        "x_test": rng.normal(size=(8, 5)).astype(np.float32),
        "y_test": np.arange(8) % 4,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


BAD_INPUTS = {
    "unknown method": (["--config.method=icarll"], "Unknown method 'icarll'"),
    "unknown dataset": (["--config.dataset.name=imagenet"], "imagenet"),
    "unknown model": (["--config.model.name=vgg16"], "Unknown model.name 'vgg16'"),
    "unknown optimizer": (["--config.train.optimizer=lion"], "config.train.optimizer must be one"),
    "negative lr": (["--config.train.lr=-0.1"], "config.train.lr must be > 0, got -0.1"),
    "mistyped key": (["--config.train.lrr=0.1"], "Did you mean config.train.lr"),
    "value of another type": (["--config.seed=abc"], "config.seed must be int >= 0, got 'abc'"),
    "impossible protocol": (["--config.protocol.increment=3"], "increment=3"),
    "memory smaller than classes": (
        ["--config=configs/digits.py:method=replay", "--config.memory.budget=5"],
        "smaller than the 10 classes",
    ),
    "unprepared tfds": (["--config.dataset.name=tfds:cifar10"], "prepare_tfds.py cifar10"),
    "missing config file": (["--config=configs/nope.py"], "nope.py"),
    "config without get_config": (["--config=incremental/__init__.py"], "get_config"),
    "config arg naming no method": (
        ["--config=configs/digits.py:method=nonsense"],
        "--config=configs/digits.py:method=nonsense failed: ValueError: Unknown method 'nonsense'",
    ),
    "bad freeze regex": (['--config.train.freeze=(("[", True),)'], "does not compile, '['"),
    "override before --config=": (
        ["--config.train.lr=-0.1", "--config=configs/digits.py:method=lwf"],
        "config.train.lr must be > 0, got -0.1",
    ),
    "method argument of another type": (
        ["--config=configs/digits.py:method=lwf", "--config.method_args.strength=abc"],
        "config.method_args.strength must be float, got 'abc'",
    ),
    "mistyped method argument": (
        ["--config=configs/digits.py:method=lwf", "--config.method_args.strenght=3"],
        "method 'lwf' has no argument 'strenght' (did you mean 'strength'?)",
    ),
}


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "def get_config(arg=None):\n    raise RuntimeError('boom')\n",
            "failed: RuntimeError: boom",
        ),
        ("def get_config(arg=None):\n    return None\n", "get_config returned NoneType"),
        ("def get_config(arg=None):\n    x = (\n", "failed (line 2): SyntaxError"),
        (
            "from configs import digits\ndef get_config(arg=None):\n    c = digits.get_config()\n"
            "    del c['train']\n    return c\n",
            "missing (13 keys): a config file starts from incremental.config.base_config()",
        ),
    ],
)
def test_a_config_file_that_fails_is_named_without_a_traceback(tmp_path, body, message):
    path = tmp_path / "bad_config.py"
    path.write_text(body)
    cmd = [sys.executable, "-m", "incremental.main", "run", f"--config={path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and message in out and "Traceback" not in out, out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_fast_and_changes_nothing(tmp_path, case):
    args, message = BAD_INPUTS[case]
    workdir = tmp_path / "existing"
    workdir.mkdir()
    (workdir / "results.json").write_text("{}")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "incremental.main", "run", *args, f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(os.listdir(workdir)) == ["results.json"]
    assert (workdir / "results.json").read_text() == "{}"
    assert elapsed < 30  # seconds, with the interpreter's start; see the benchmark note in README


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    cmd = [sys.executable, "-m", "incremental.main", "run", "--debug", "--config.train.lr=-0.1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" in out and "must be > 0, got -0.1" in out, out


@pytest.mark.slow  # two runs through the command line
def test_a_full_disk_is_one_message_and_the_same_command_resumes(tmp_path):
    """A checkpoint the disk refuses (here: files limited to 20 kB, as a full disk refuses them):
    exit 2, a message naming the directory, the cause and what to do, no traceback (orbax logs
    one from its writer thread); the same command then completes the run."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "incremental.main", "run", f"--workdir={workdir}",
           "--config.train.epochs=1", "--config.train_first.epochs=1", "--config.log.plot=False"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert (
        f"A checkpoint could not be written under {workdir / 'checkpoints'}: File too large" in out
    )
    assert "raise the file size limit" in out and "Traceback" not in out, out
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(y_train=None), "y_train"),
        (dict(y_train=np.arange(39) % 4), "40 examples but y_train has 39"),
        (dict(y_train=(np.arange(40) % 4) + 0.5), "integer"),
        (dict(x_train=np.full((40, 5), np.nan, np.float32)), "NaN"),
        (dict(x_test=np.full((8, 5), np.inf, np.float32)), "infinite"),
        (dict(x_train=np.ones((40, 5), np.complex64)), "x_train has complex dtype complex64"),
        (dict(x_test=np.full((8, 5), 1e300)), "x_test has values of magnitude up to 1e\\+300"),
        (dict(y_test=np.arange(8) % 4 - 1), "negative class ids"),
        (dict(x_test=np.zeros((8, 6), np.float32)), "x_test"),
        # The label contract: ids 0..K-1, every class in both splits.
        (
            dict(y_train=SPARSE[np.arange(40) % 4], y_test=SPARSE[np.arange(8) % 4]),
            r"the ids are not 0..3; missing 0, 1, 2\. Set dataset.remap_labels=True",
        ),
        (dict(y_test=np.arange(8) % 5), "y_test has classes that y_train lacks: 4"),
        (dict(y_test=np.arange(8) % 3), "y_train has classes that y_test lacks .*: 3"),
    ],
)
def test_bad_npz_is_refused_before_anything_is_written(tmp_path, overrides, message):
    path = write_npz(tmp_path / "data.npz", **overrides)
    config = small_config()
    config.dataset.name = f"npz:{path}"
    with pytest.raises(ValueError, match=message):
        run_lib.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_remapped_sparse_labels_give_the_numbers_of_dense_ones(tmp_path):
    """dataset.remap_labels=True: ids {3, 7, 100, 2e9} are classes 0..3 in sorted order, the run
    the same as with those labels written as 0..3 (and a stray huge id allocates nothing)."""
    results = {}
    for name, ids in (("dense", np.arange(4)), ("sparse", SPARSE)):
        path = write_npz(
            tmp_path / f"{name}.npz", y_train=ids[np.arange(40) % 4], y_test=ids[np.arange(8) % 4]
        )
        config = small_config()
        config.dataset.name, config.dataset.remap_labels = f"npz:{path}", True
        results[name] = run_lib.run(config, str(tmp_path / name))
    assert results["sparse"]["accuracy_matrix"] == results["dense"]["accuracy_matrix"]
    assert results["sparse"]["class_order"] == results["dense"]["class_order"]
    assert results["sparse"]["config"]["dataset"]["remap_labels"] is True


def test_data_changed_between_stop_and_resume_is_refused_unless_allowed(tmp_path):
    """The npz rewritten with its labels shuffled: resume and evaluate refuse, naming both
    fingerprints; --allow_data_change goes on, and each phase's record keeps its data's."""
    path = write_npz(tmp_path / "data.npz")
    config = small_config()
    config.dataset.name = f"npz:{path}"
    config.protocol.init_classes = config.protocol.increment = 2
    workdir = str(tmp_path / "w")
    run_lib.run(config, workdir, stop_after=0)
    before = json.loads((tmp_path / "w" / "results.json").read_text())["phases"][0]
    write_npz(path, y_train=np.random.default_rng(1).permutation(np.arange(40) % 4))
    saved = sorted(os.listdir(tmp_path / "w" / "checkpoints" / "phase"))
    with pytest.raises(ValueError, match=f"fingerprint was {before['data_fingerprint']}"):
        run_lib.run(config, workdir)
    with pytest.raises(ValueError, match="trained on other data"):
        workdirs.evaluate(workdir)
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints" / "phase")) == saved
    results = run_lib.run(config, workdir, allow_data_change=True)
    prints = [p["data_fingerprint"] for p in results["phases"]]
    assert prints[0] == before["data_fingerprint"] != prints[1] and results["complete"]


HOLD_LOCK = """
import sys, time
sys.path.insert(0, ".")
from incremental import lock
with lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_a_work_directory_is_refused_until_the_first_ends(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workdir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        config = small_config()
        with pytest.raises(ValueError, match=rf"in use by another process \(pid {holder.pid}: "):
            run_lib.run(config, str(workdir), stop_after=0)
        assert sorted(os.listdir(workdir)) == [".lock"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock went with it: the next run takes the directory.
    assert run_lib.run(config, str(workdir), stop_after=0)["phases"]


def test_conv_model_on_feature_vectors_is_refused(tmp_path):
    config = small_config()
    config.dataset.name = f"npz:{write_npz(tmp_path / 'data.npz')}"
    config.protocol.init_classes = config.protocol.increment = 2
    config.model.name, config.model.kwargs = "resnet32", {}
    with pytest.raises(ValueError, match="cannot take examples of shape"):
        run_lib.run(config, str(tmp_path / "w"))


def test_unwritable_workdir_is_refused(tmp_path):
    # Under a regular file no directory can be made, whoever runs the test (CI runs as root).
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot be written"):
        run_lib.run(small_config(), str(blocker / "w"))
    assert blocker.read_text() == "not a directory"


def test_a_workdir_whose_parents_do_not_exist_yet_is_created(tmp_path):
    """The default `runs/<name>` on a fresh checkout, where `runs/` does not exist."""
    config = small_config()
    config.train.epochs = config.train_first.epochs = 1
    workdir = tmp_path / "runs" / "nested" / "w"
    results = run_lib.run(config, str(workdir), stop_after=0)
    assert (workdir / "results.json").exists() and len(results["accuracy_matrix"]) == 1
