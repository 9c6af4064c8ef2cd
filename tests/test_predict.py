"""`incremental predict`: a saved model's top classes for image files, folders and .npz arrays."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from predict_helpers import seen_test_examples, trained, write_npz

from incremental import predict, workdirs
from incremental.methods import rehearsal

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory):
    return trained(tmp_path_factory, "replay")


@pytest.fixture(scope="module")
def icarl_run(tmp_path_factory):
    return trained(tmp_path_factory, "icarl")


def top(predictions, key="position"):
    return np.array([p["top_k"][0][key] for p in predictions])


@pytest.mark.parametrize(
    "run, classifier, phase, kind",
    [
        ("replay_run", None, None, "probability"),
        ("replay_run", "nme", None, "negative nme distance"),
        ("replay_run", None, 0, "probability"),
        ("icarl_run", "head", None, "probability"),
        ("icarl_run", "nme", None, "negative nme distance"),
    ],
)
def test_top1_on_the_test_set_is_the_evaluations_prediction(
    request, tmp_path, run, classifier, phase, kind
):
    workdir = request.getfixturevalue(run)
    rs, saved = workdirs.restore(workdir, phase)
    _, expected = workdirs.evaluate_saved(rs, saved, predictions=True)
    x = seen_test_examples(workdir, phase)
    npz = write_npz(tmp_path / "test.npz", x)
    num_seen = rs.protocol.num_seen(saved.phase)
    out = predict.predict(workdir, [npz], top_k=num_seen + 5, phase=phase, classifier=classifier)
    assert len(out) == len(x) and len(set(top(out))) > 1
    np.testing.assert_array_equal(top(out), expected[classifier or "head"])
    order = list(rs.protocol.class_order)
    for i, entry in enumerate(out[:5]):
        assert entry["input"] == f"{npz}[{i}]" and entry["kind"] == kind
        assert entry["phase"] == saved.phase and entry["classifier"] == (classifier or "head")
        # Every seen class, and no other: top_k beyond the seen classes is all of them.
        assert sorted(b["position"] for b in entry["top_k"]) == list(range(num_seen))
        assert all(
            b["dataset_id"] == order[b["position"]] == int(b["name"]) for b in entry["top_k"]
        )
        field = "probability" if kind == "probability" else "score"
        values = [b[field] for b in entry["top_k"]]
        assert values == sorted(values, reverse=True)
        if field == "probability":
            assert sum(values) == pytest.approx(1.0)
        else:
            assert all(v <= 0 for v in values)  # negated distances


def test_image_files_and_folders_predict_as_their_arrays(replay_run, tmp_path):
    x = seen_test_examples(replay_run)[:6]  # uint8 (6, 8, 8, 1), values 0..16
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / ("sub" if i % 2 else "") / f"digit{i}.png" for i in range(len(x))]
    for image, path in zip(x, paths, strict=True):
        Image.fromarray(image[:, :, 0], mode="L").save(path)
    (folder / "notes.txt").write_text("not an image, and not named like one: skipped")
    big = tmp_path / "big.jpg"  # RGB and another size: read as L and resized to 8x8
    Image.fromarray(np.repeat(np.kron(x[0], np.ones((3, 3, 1), np.uint8)), 3, axis=2)).save(big)
    resized = np.asarray(Image.open(big).convert("L").resize((8, 8), Image.Resampling.BILINEAR))

    from_files = predict.predict(replay_run, [str(folder), str(big)], top_k=3)
    arrays = np.concatenate([x[np.argsort([str(p) for p in paths])], resized[None, :, :, None]])
    from_npz = predict.predict(replay_run, [write_npz(tmp_path / "x.npz", arrays)], top_k=3)
    assert [p["input"] for p in from_files] == [*sorted(str(p) for p in paths), str(big)]
    assert [p["top_k"] for p in from_files] == [p["top_k"] for p in from_npz]
    one = predict.predict(replay_run, [str(paths[3])], top_k=3)
    assert (
        one[0]["top_k"]
        == from_files[[p["input"] for p in from_files].index(str(paths[3]))]["top_k"]
    )


def test_inputs_that_are_not_images_or_examples_are_refused_by_name(replay_run, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG not really")
    for path in (text, fake):
        with pytest.raises(ValueError, match=f"{path} is not an image"):
            predict.predict(replay_run, [str(path)])
    with pytest.raises(ValueError, match="no such file"):
        predict.predict(replay_run, [str(tmp_path / "missing.png")])
    wrong = write_npz(tmp_path / "wrong.npz", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"wrong.npz: x has shape \(2, 8, 8\).*\(8, 8, 1\)"):
        predict.predict(replay_run, [wrong])
    with pytest.raises(ValueError, match="has no classifier 'nope'; choose one of head, nme"):
        predict.predict(replay_run, [str(fake)], classifier="nope")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        predict.predict(replay_run, [str(fake)], top_k=0)


def test_all_inputs_go_through_one_compile(replay_run, tmp_path, monkeypatch):
    traces = []
    nme_scores = rehearsal.nme_scores

    def counting(out, method_state):
        traces.append(out.features.shape)  # a Python side effect: once per trace
        return nme_scores(out, method_state)

    monkeypatch.setattr(rehearsal, "nme_scores", counting)
    x = seen_test_examples(replay_run)
    x = np.concatenate([x] * 4)[:1234]  # 2.5 batches of config.eval.batch_size (500)
    out = predict.predict(replay_run, [write_npz(tmp_path / "x.npz", x)], classifier="nme")
    assert len(out) == 1234 and len(traces) == 1


def cli(*args):
    cmd = [sys.executable, "-m", "incremental.main", "predict", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_command_prints_json_and_refuses_a_non_image(replay_run, tmp_path):
    x = seen_test_examples(replay_run)[:7]
    npz = write_npz(tmp_path / "x.npz", x)
    proc = cli(replay_run, npz, "--format=json", "--top-k=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert len(out) == 7 and all(len(p["top_k"]) == 2 for p in out)
    assert [p["top_k"] for p in out] == [
        p["top_k"] for p in predict.predict(replay_run, [npz], top_k=2)
    ]
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    proc = cli(replay_run, npz, str(text))
    assert proc.returncode == 2
    assert f"{text} is not an image" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
