"""`incremental export`: a saved model as a jax.export artifact that runs without the package."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from predict_helpers import seen_test_examples, trained, write_npz

from incremental import export, predict

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory):
    return trained(tmp_path_factory, "replay")


@pytest.fixture(scope="module")
def exported(replay_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "artifact")
    return out, export.export(replay_run, out)


def readme_snippet() -> str:
    """The Python block of README's "Predict and export" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Predict and export", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_artifact_runs_without_the_package_and_gives_the_models_scores(
    replay_run, exported, tmp_path
):
    out, _ = exported
    x = seen_test_examples(replay_run)[:5]
    npz = write_npz(tmp_path / "inputs.npz", x)
    # README's snippet as it stands, then the same artifact on a batch of 1.
    code = readme_snippet().replace("runs/A-export", out).replace("inputs.npz", npz)
    code += (
        "import sys\n"
        "one = np.asarray(model.call(x[:1]))\n"
        f"np.savez({str(tmp_path / 'scores.npz')!r}, five=scores, one=one)\n"
        "assert 'incremental' not in sys.modules, 'the artifact needs the package'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = predict.load(replay_run)
    expected = predict.score(loaded, x)
    got = np.load(tmp_path / "scores.npz")
    assert got["five"].shape == (5, 10) and got["one"].shape == (1, 10)
    np.testing.assert_allclose(got["five"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["one"], expected[:1], rtol=1e-6, atol=1e-6)
    names = [c["name"] for c in loaded.classes]
    assert proc.stdout.strip() == repr([names[i] for i in expected.argmax(axis=1)])


def test_classes_and_preprocessing_describe_the_run(replay_run, exported):
    out, doc = exported
    with open(os.path.join(replay_run, "results.json")) as f:
        order = json.load(f)["class_order"]
    with open(os.path.join(out, export.CLASSES_FILE)) as f:
        classes = json.load(f)
    assert classes == [
        {"position": p, "dataset_id": c, "name": str(c)} for p, c in enumerate(order)
    ]
    with open(os.path.join(out, export.PREPROCESSING_FILE)) as f:
        assert json.load(f) == doc
    assert doc["input"]["shape"] == ["batch", 8, 8, 1] and doc["input"]["dtype"] == "uint8"
    assert doc["input"]["training_range"] == [0.0, 16.0]
    assert doc["output"]["shape"] == ["batch", 10] and doc["output"]["kind"] == "logits"
    assert doc["source"]["phase"] == 2 and doc["source"]["method"] == "replay"
    loaded = predict.load(replay_run)
    assert doc["normalization"]["mean"] == loaded.rs.data.norm.mean.reshape(-1).tolist()
    assert doc["normalization"]["std"] == loaded.rs.data.norm.std.reshape(-1).tolist()
    assert sorted(os.listdir(out)) == sorted(
        [export.ARTIFACT_FILE, export.CLASSES_FILE, export.PREPROCESSING_FILE]
    )


def test_names_come_from_results_json(replay_run, tmp_path):
    workdir = str(tmp_path / "named")
    shutil.copytree(replay_run, workdir)
    path = os.path.join(workdir, "results.json")
    with open(path) as f:
        results = json.load(f)
    with open(path, "w") as f:
        json.dump({**results, "class_names": NAMES}, f)
    export.export(workdir, str(tmp_path / "out"))
    with open(tmp_path / "out" / export.CLASSES_FILE) as f:
        classes = json.load(f)
    assert [c["name"] for c in classes] == [NAMES[c] for c in results["class_order"]]
    x = seen_test_examples(workdir)[:3]
    top = predict.predict(workdir, [write_npz(tmp_path / "x.npz", x)], top_k=1)
    assert all(p["top_k"][0]["name"] == NAMES[p["top_k"][0]["dataset_id"]] for p in top)


def test_an_existing_output_is_refused_and_left_alone(replay_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export.export(replay_run, str(out))
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export.export(replay_run, str(out / "mine.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    export.export(replay_run, str(empty))  # an empty directory is fine
    assert len(os.listdir(empty)) == 3
    assert sorted(os.listdir(tmp_path)) == ["empty", "taken"]  # no temporary directory left


def test_a_run_that_stopped_early_is_refused_unless_a_phase_is_given(tmp_path_factory, tmp_path):
    workdir = trained(tmp_path_factory, "replay", stop_after=0)
    with pytest.raises(
        ValueError, match=r"not complete: it has saved phases \[0\] of its 3.*--phase=0"
    ):
        export.export(workdir, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    doc = export.export(workdir, str(tmp_path / "out"), phase=0)
    assert doc["output"]["shape"] == ["batch", 4] and doc["source"]["phase"] == 0
    with open(tmp_path / "out" / export.CLASSES_FILE) as f:
        assert len(json.load(f)) == 4


def test_the_command_exports_and_refuses_with_a_message(replay_run, tmp_path):
    def cli(*args):
        cmd = [sys.executable, "-m", "incremental.main", "export", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)

    out = str(tmp_path / "artifact")
    proc = cli(replay_run, f"--out={out}", "--classifier=nme")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, export.PREPROCESSING_FILE)) as f:
        assert json.load(f)["output"]["kind"] == "negative nme distance"
    proc = cli(replay_run, f"--out={out}")
    assert proc.returncode == 2 and "exists and is not an empty directory" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
