"""LUCIR: the cosine head, its two extra losses against numpy, and end to end on digits."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from incremental import methods, workdirs
from incremental import run as run_lib
from incremental.methods import Batch, Outputs, PhaseContext, PhaseInfo
from incremental.methods.lucir import less_forget_loss, margin_ranking_loss
from incremental.models import build_model
from incremental.phase import begin
from incremental.train import apply_any_head


def unit(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def tiny_cosine_model(key, num_classes=4, sigma=-2.5):
    model = build_model("mlp", num_classes, head="cosine", hidden=(8,))
    x = jax.random.normal(key, (6, 3), jnp.float32)
    variables = model.init(key, x, train=False)
    params = variables["params"]
    params = {**params, "head": {**params["head"], "sigma": jnp.asarray(sigma, jnp.float32)}}
    return model, {"params": params}, x


def test_cosine_logits_are_sigma_times_cosine_and_bounded(key):
    model, variables, x = tiny_cosine_model(key)
    feats, logits = model.apply(variables, x, train=False)
    head = variables["params"]["head"]
    f, w = np.asarray(feats, np.float64), np.asarray(head["kernel"], np.float64)
    expected = float(head["sigma"]) * unit(f, 1) @ unit(w, 0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(logits)).max() <= abs(float(head["sigma"])) + 1e-6


def test_less_forget_loss_matches_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = 1.0 - (unit(student, 1) * unit(teacher, 1)).sum(1)
    got = less_forget_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_loss_terms_vanish_when_student_is_teacher(key):
    """With the teacher equal to the student, the less-forget term is 0; the total is CE + MR."""
    model, variables, x = tiny_cosine_model(key, num_classes=4)
    teacher = {"params": {**variables["params"]}}
    teacher["params"]["head"] = {**teacher["params"]["head"]}
    teacher["params"]["head"]["kernel"] = teacher["params"]["head"]["kernel"][:, :3]
    info = PhaseInfo(phase=1, num_old=3, num_new=1)
    y = jnp.array([0, 1, 2, 3, 3, 0])
    feats, logits = model.apply(variables, x, train=False)
    method = methods.build("lucir")
    total, metrics = method.loss(
        Outputs(feats, logits),
        Batch(x, y, jnp.ones(6)),
        params=variables["params"],
        method_state={"teacher": teacher},
        info=info,
        apply_fn=functools.partial(apply_any_head, model),
    )
    np.testing.assert_allclose(metrics["lf"], 0.0, atol=1e-5)  # float32 rounding x 8.7
    np.testing.assert_allclose(total, metrics["ce"] + metrics["mr"], atol=1e-5)
    assert float(method.less_forget_weight(info)) == pytest.approx(5.0 * math.sqrt(3 / 1))


def test_margin_ranking_loss_matches_numpy():
    # 2 old classes, 3 new; K = 2, m = 0.5. The last example is padding (weight 0).
    cos = np.array(
        [
            [0.9, 0.1, 0.2, 0.5, 0.3],  # old class 0: negatives 0.5, 0.3
            [0.2, 0.4, 0.6, 0.1, 0.7],  # old class 1: negatives 0.7, 0.6
            [0.1, 0.2, 0.8, 0.3, 0.4],  # new class: no term
            [0.0, 0.95, -0.2, -0.1, 0.0],  # old class 1, margin met: 0
            [0.0, 0.0, 0.9, 0.9, 0.9],  # padding, old class 0
        ],
        np.float32,
    )
    y = np.array([0, 1, 2, 1, 0])
    weight = np.array([1, 1, 1, 1, 0], np.float32)
    pairs = [
        max(0.0, 0.5 - 0.9 + 0.5) + max(0.0, 0.5 - 0.9 + 0.3),
        max(0.0, 0.5 - 0.4 + 0.7) + max(0.0, 0.5 - 0.4 + 0.6),
        0.0,
    ]
    expected_mean = sum(pairs) / (3 * 2)  # PyTorch MarginRankingLoss: mean over 3 hard x K pairs
    got = margin_ranking_loss(
        jnp.asarray(cos),
        jnp.asarray(y),
        jnp.asarray(weight),
        num_old=2,
        num_seen=5,
        top_k=2,
        margin=0.5,
    )
    got = np.asarray(got)
    assert got[2] == 0.0 and got[3] == 0.0
    np.testing.assert_allclose((got * weight).sum() / weight.sum(), expected_mean, rtol=1e-6)


def test_lucir_freezes_old_columns_only_after_phase_0():
    method = methods.build("lucir")
    assert method.head == "cosine"
    assert not method.setup(PhaseInfo(0, 0, 2)).freeze_old_columns
    assert method.setup(PhaseInfo(1, 2, 2)).freeze_old_columns
    with pytest.raises(ValueError, match="top_k"):
        methods.build("lucir", {"top_k": 0})


def config_for(method, epochs=10, seed=0):
    config = digits.get_config(f"method={method}")
    config.seed = seed
    config.log.progress = config.log.plot = False
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = (epochs - 2,)
    return config


def test_lucir_remembers_on_digits(tmp_path):
    finetune = run_lib.run(config_for("finetune"), str(tmp_path / "finetune"))
    results = run_lib.run(config_for("lucir"), str(tmp_path / "lucir"))
    assert results["last_accuracy"] >= finetune["last_accuracy"] + 0.40
    assert results["nme_last_accuracy"] >= finetune["last_accuracy"] + 0.40
    assert len(results["nme_accuracy_matrix"]) == 5


def test_class_balanced_finetuning_trains_the_head_columns_alone(tmp_path):
    """The official code's CBF (ft_flag=2): after the phase, the head's columns move on the
    exemplars; the backbone and sigma stay those the phase's training left."""
    saved = {}
    for cbf in (False, True):
        config = config_for("lucir", epochs=3)
        config.protocol.phase_sizes = "4,6"
        config.method_args.class_balanced_finetune = cbf
        config.method_args.cbf_epochs, config.method_args.cbf_milestones = 4, (2,)
        results = run_lib.run(config, str(tmp_path / str(cbf)))
        assert results["complete"] and 0 < results["last_accuracy"] <= 1
        saved[cbf] = workdirs.restore(str(tmp_path / str(cbf)), 1)[1].state["params"]
    plain, tuned = saved[False], saved[True]
    for a, b in zip(*(jax.tree.leaves(p["backbone"]) for p in (plain, tuned)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(plain["head"]["sigma"]) == float(tuned["head"]["sigma"])
    moved = np.abs(np.asarray(plain["head"]["kernel"]) - np.asarray(tuned["head"]["kernel"]))
    assert (moved[:, :4].max(0) > 0).all() and (moved[:, 4:].max(0) > 0).all()  # old and new


@pytest.mark.parametrize("imprint", [True, False])
def test_new_class_weights_are_the_normalised_mean_of_normalised_features(imprint):
    """The official code's --imprint_weights: w_c = normalise(mean_i normalise(f(x_i)))."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 6)).astype(np.float32) * rng.uniform(0.1, 10, size=(12, 1))
    y = np.repeat(np.arange(3), 4)  # classes 0 and 1 old, 2 new
    info = PhaseInfo(1, 2, 1)
    ctx = PhaseContext(info, y, feats, lambda v, x: jnp.asarray(x))
    variables = {
        "params": {"head": {"kernel": jnp.ones((6, 2)), "sigma": jnp.asarray(1.0)}},
        "batch_stats": {},
    }
    method = methods.build("lucir", {"imprint": imprint})
    config = digits.get_config("method=lucir")
    wide = begin.widen(config, method, variables, ctx, jax.random.PRNGKey(0))
    new = np.asarray(wide["params"]["head"]["kernel"])[:, 2]
    unit = feats[8:] / np.linalg.norm(feats[8:], axis=1, keepdims=True)
    direction = unit.mean(0) / np.linalg.norm(unit.mean(0))
    cosine = float(new @ direction / np.linalg.norm(new))
    assert cosine == pytest.approx(1.0, abs=1e-5) if imprint else cosine < 0.99
