"""FOSTER: its weights and losses against numpy, the shapes of its two stages, the compression's
fidelity, and end to end on digits (5 x 2 classes, memory 200)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from incremental import checkpoint, methods, surgery, train
from incremental import run as run_lib
from incremental.data import device
from incremental.methods import Batch, Outputs, PhaseInfo
from incremental.methods.foster import bkd_loss, effective_number_weights
from incremental.models import head_logits
from incremental.phase import begin, fit, load, save
from incremental.phase import model as phase_model

EPOCHS = 5


def config_for(method, epochs=EPOCHS):
    config = digits.get_config(f"method={method}")
    config.log.progress = config.log.plot = False
    config.protocol.init_classes = config.protocol.increment = 2
    config.memory.budget = 200
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = (epochs - 2,)
    if method == "foster":
        config.method_args.compression_epochs = epochs
    return config


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_effective_number_weights_by_hand():
    # (1 - b) / (1 - b**n) for n = 20, 20, 150, 150, scaled to sum to 4 (worked out by hand).
    np.testing.assert_allclose(
        effective_number_weights(np.array([20, 20, 150, 150]), 0.96),
        [1.282690, 1.282690, 0.717310, 0.717310],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        effective_number_weights(np.array([20, 20, 150, 150]), 0.97),
        [1.368939, 1.368939, 0.631061, 0.631061],
        rtol=1e-5,
    )
    np.testing.assert_allclose(effective_number_weights(np.array([7, 7, 7]), 0.96), 1.0, rtol=1e-6)


def test_bkd_matches_numpy_and_is_kd_for_equal_weights():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 4)).astype(np.float32) * 3
    weights = np.array([1.5, 1.5, 0.5, 0.5], np.float32)
    soft = np.exp(log_softmax(teacher / 2.0)) * weights
    soft /= soft.sum(1, keepdims=True)
    expected = -(soft * log_softmax(student / 2.0)).sum(1)
    got = bkd_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights), 2.0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    plain = -(np.exp(log_softmax(teacher / 2.0)) * log_softmax(student / 2.0)).sum(1)
    got = bkd_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.ones(4), 2.0)
    np.testing.assert_allclose(np.asarray(got), plain, rtol=1e-5)


def test_boosting_loss_matches_numpy():
    """CE of the logits divided by the beta1 weights + CE of fe_fc + KD from the old head."""
    rng = np.random.default_rng(1)
    dim, num_old, num_new = 3, 2, 2
    feats = rng.normal(size=(4, 2 * dim)).astype(np.float32)
    logits = rng.normal(size=(4, num_old + num_new)).astype(np.float32) * 2
    y = np.array([0, 1, 2, 3], np.int32)
    old_head = {"kernel": rng.normal(size=(dim, num_old)), "bias": rng.normal(size=num_old)}
    fe_fc = {"kernel": rng.normal(size=(dim, num_old + num_new)), "bias": np.zeros(4)}
    old_head, fe_fc = (
        jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), h) for h in (old_head, fe_fc)
    )
    weights = effective_number_weights(np.array([10, 10, 100, 100]), 0.96)
    method = methods.build("foster", {"lambda_okd": 0.5})
    loss, metrics = method.loss(
        Outputs(jnp.asarray(feats), jnp.asarray(logits)),
        Batch(jnp.asarray(feats), jnp.asarray(y), jnp.ones(4)),
        params={"fe_fc": fe_fc},
        method_state={"old_head": old_head, "boost_weights": jnp.asarray(weights)},
        info=PhaseInfo(1, num_old, num_new),
        apply_fn=None,
    )
    rows = np.arange(4)
    ce = -log_softmax(logits / weights)[rows, y]
    fe_logits = feats[:, dim:] @ np.asarray(fe_fc["kernel"]) + np.asarray(fe_fc["bias"])
    fe = -log_softmax(fe_logits)[rows, y]
    old = feats[:, :dim] @ np.asarray(old_head["kernel"]) + np.asarray(old_head["bias"])
    kd = -(np.exp(log_softmax(old / 2.0)) * log_softmax(logits[:, :num_old] / 2.0)).sum(1)
    np.testing.assert_allclose(np.asarray(metrics["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["fe"]), fe, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss), ce + fe + 0.5 * kd, rtol=1e-5)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="oofc"):
        methods.build("foster", {"oofc": "az"})
    with pytest.raises(ValueError, match="beta1"):
        methods.build("foster", {"beta1": 1.0})


def predictions(model, variables, x, config, data):
    apply = train.make_apply_batches(model, data.norm, lambda out, _: jnp.argmax(out.logits, -1))
    return train.run_batched(apply, variables, {}, x, config.eval.batch_size)


@pytest.fixture(scope="module")
def two_phases():
    """Phase 0 whole, then phase 1 by hand: its trained two-branch model and the compressed one."""
    config = config_for("foster")
    data, protocol, _ = load.load_data(config)
    method = methods.build("foster", config.method_args, config.memory)
    first = run_lib.train_phase(config, method, data, protocol, 0, None, method.init_state())
    single = surgery.count_params(first.variables["params"], depth=1)
    pr, state, method_state = begin.begin(
        config, method, data, protocol, 1, first, first.method_state
    )
    # Before training (the state is donated): the old branch and the old head are the old model.
    x = data.x_train[np.asarray(first.method_state["memory"]["indices"])]
    old_model = phase_model.phase_model(config, method, PhaseInfo(0, 0, 2), final=True)
    _, old_logits = old_model.apply(first.variables, device.normalize(x, data.norm), train=False)
    feats, logits = pr.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats},
        device.normalize(x, data.norm),
        train=False,
    )
    dim = state.params["head"]["kernel"].shape[0] // 2
    start = {
        "old_logits": np.asarray(old_logits),
        "logits": np.asarray(logits),
        "old_head_logits": np.asarray(head_logits(feats[:, :dim], method_state["old_head"])),
    }
    steps = fit.Steps.of(pr)
    while steps.remaining(state):
        state, method_state, metrics = pr.train_epoch(state, method_state, pr.x, pr.y)
        steps.add(metrics)
    teacher = {"params": state.params, "batch_stats": state.batch_stats}
    reported, kept = method.compress(pr.ctx, teacher, method_state)
    student = kept["student"]
    initial = method.student_init(teacher, method_state["old_head"], pr.info, jax.random.PRNGKey(1))
    return types.SimpleNamespace(
        reported=reported,
        kept=kept,
        config=config,
        data=data,
        method=method,
        pr=pr,
        single=single,
        start=start,
        teacher=teacher,
        student=student,
        initial=initial,
    )


def test_growth_starts_from_the_old_model(two_phases):
    start = two_phases.start
    np.testing.assert_allclose(start["old_head_logits"], start["old_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(start["logits"][:, :2], start["old_logits"], rtol=1e-5, atol=1e-5)


def test_parameter_counts_of_both_stages(two_phases):
    backbone, head = two_phases.single["backbone"], two_phases.single["head"]
    dim = two_phases.teacher["params"]["head"]["kernel"].shape[0] // 2
    assert head == dim * 2 + 2  # phase 0: one backbone, 2 classes
    trained = surgery.count_params(two_phases.teacher["params"], depth=2)
    assert trained["backbone"] == 2 * backbone
    assert trained["backbone/branch_0"] == trained["backbone/branch_1"] == backbone
    assert trained["fe_fc"] == dim * 4 + 4
    student = surgery.count_params(two_phases.student["params"], depth=1)
    assert student == {"": backbone + dim * 4 + 4, "backbone": backbone, "head": dim * 4 + 4}
    # The phase reports (evaluates, saves) the teacher without fe_fc, shaped as the run's final
    # model; with report='student' the student is the final model.
    config, info = two_phases.config, two_phases.pr.info
    teacher = {k: v for k, v in two_phases.teacher["params"].items() if k != "fe_fc"}
    for report, final in (("teacher", teacher), ("student", two_phases.student["params"])):
        method = methods.build("foster", {**config.method_args, "report": report})
        model = phase_model.phase_model(config, method, info, final=True)
        shapes = jax.eval_shape(
            lambda m=model: phase_model.init_variables(
                m, two_phases.data.x_train[0], jax.random.PRNGKey(0)
            )
        )
        assert jax.tree.structure(shapes["params"]) == jax.tree.structure(final), report
    assert set(two_phases.reported["params"]) == {"backbone", "head"}
    assert set(two_phases.reported["params"]["backbone"]) == {"branch_0", "branch_1"}
    pairs = zip(
        *(jax.tree.leaves(t) for t in (teacher, two_phases.reported["params"])), strict=True
    )
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "boost_weights" not in two_phases.kept


def test_the_student_is_reported_beside_the_teacher_and_the_next_phase_grows_from_it(two_phases):
    method, info = two_phases.method, two_phases.pr.info
    other = two_phases.method.companions(info, two_phases.reported, two_phases.kept)
    (name, (backbone, variables)), *rest = other.items()
    assert name == "student" and not rest and variables is two_phases.student
    assert method.grow_from(two_phases.reported, two_phases.kept) is two_phases.student
    # report='student': the other way round; in phase 0 the one model is both.
    paper = methods.build("foster", {"report": "student"})
    teacher = {"params": {"backbone": {}}, "batch_stats": {}}
    assert list(paper.companions(info, two_phases.student, {"teacher": teacher})) == ["teacher"]
    assert paper.grow_from(two_phases.student, {"teacher": teacher}) is two_phases.student
    first = PhaseInfo(0, 0, 2)
    assert method.companions(first, teacher, {})["student"][1] is teacher


def test_compression_distils_the_two_branch_model(two_phases):
    pr, config, data = two_phases.pr, two_phases.config, two_phases.data
    x = np.asarray(jax.device_get(pr.x))
    final = phase_model.phase_model(
        config, two_phases.method, pr.info, final=True, backbone=lambda make: make()
    )  # the student's
    teacher = predictions(pr.model, two_phases.teacher, x, config, data)
    student = predictions(final, two_phases.student, x, config, data)
    initial = predictions(final, two_phases.initial, x, config, data)
    agree = (teacher == student).mean()
    assert agree >= 0.9
    assert agree >= (teacher == initial).mean() + 0.2  # the training, not the start, agrees


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {
        m: (run_lib.run(config_for(m), str(path)), path)
        for m in ("finetune", "foster")
        for path in [tmp_path_factory.mktemp(m)]
    }


def test_foster_remembers_and_reports_teacher_and_student(runs):
    foster, finetune = runs["foster"][0], runs["finetune"][0]
    assert len(foster["accuracy_matrix"]) == 5
    for key in ("last_accuracy", "nme_last_accuracy", "student_last_accuracy"):
        assert foster[key] >= finetune["last_accuracy"] + 0.40, key
    teacher, student = foster["accuracy_matrix"], foster["student_accuracy_matrix"]
    assert teacher[0] == student[0]  # phase 0: one model
    assert teacher[1:] != student[1:]  # later: two models


def test_saved_phases_hold_the_two_branch_teacher_and_the_student_it_grows_from(runs):
    config, path = config_for("foster"), runs["foster"][1]
    data, protocol, _ = load.load_data(config)
    method = methods.build("foster", config.method_args, config.memory)
    ckpts = checkpoint.Checkpoints(str(path))
    try:
        saved = [
            ckpts.restore(p, save.state_target(config, method, protocol, data, p))[:2]
            for p in range(protocol.num_phases)
        ]
    finally:
        ckpts.close()
    single = surgery.count_params(saved[0][0]["params"], depth=1)["backbone"]
    for phase, (state, method_state) in enumerate(saved):
        assert "fe_fc" not in state["params"]
        assert method_state["old_head"]["kernel"].shape[1] == protocol.num_seen(phase)
        count = surgery.count_params(state["params"], depth=1)
        dim = state["params"]["head"]["kernel"].shape[0]
        assert count["head"] == (dim + 1) * protocol.num_seen(phase)
        assert count["backbone"] == (1 if phase == 0 else 2) * single
        if phase:
            student = method_state["student"]["params"]
            assert surgery.count_params(student, depth=1)["backbone"] == single
            # The old head is the student's; the next phase's frozen branch_0 is this student.
            np.testing.assert_array_equal(
                method_state["old_head"]["kernel"], student["head"]["kernel"]
            )
        if phase >= 2:
            grown_from = saved[phase - 1][1]["student"]["params"]["backbone"]
            branch_0 = state["params"]["backbone"]["branch_0"]
            for a, b in zip(*(jax.tree.leaves(t) for t in (grown_from, branch_0)), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_beta1_may_be_one_per_phase_after_the_first():
    method = methods.build("foster", {"beta1": [0.98, 0.9]})
    assert method.beta1 == (0.98, 0.9)
    assert (method.beta1_of(1), method.beta1_of(2)) == (0.98, 0.9)
    assert methods.build("foster").beta1_of(7) == 0.96
    with pytest.raises(ValueError, match="beta1 has 2 values.*phase 3"):
        method.beta1_of(3)
    with pytest.raises(ValueError, match="beta1"):
        methods.build("foster", {"beta1": (0.9, 1.0)})
    with pytest.raises(ValueError, match="report"):
        methods.build("foster", {"report": "both"})
