"""The adapter methods on a tiny ViT over digits, 3 phases: the adapters start as the identity, APER
trains only its adapters and head in phase 0 and is the nearest prototype on [pre-trained, adapted]
features, and EASE adds one adapter set per phase, keeps the old ones, and completes the old
classes' prototypes in the new subspaces by the paper's formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from incremental import methods, models, workdirs
from incremental import run as run_lib
from incremental.data import device
from incremental.methods import PhaseInfo
from incremental.methods.aper import Aper
from incremental.models import build_backbone
from incremental.phase import model as phase_model
from incremental.phase import pretrained

TINY = {"width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "patch": 4, "resize": 8}
SIZES = (4, 3, 3)
BOTTLENECK = 8
BLOCK = 512  # examples per feature computation


def config_for(method):
    config = digits.get_config(f"method={method},model=vit")
    config.model.kwargs = dict(TINY)
    config.protocol.phase_sizes = ",".join(map(str, SIZES))
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.log.progress = config.log.plot = False
    config.method_args.bottleneck = BOTTLENECK
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 3-phase run of each method from a random-init ViT, shared below: (results, workdir)."""
    out = {}
    for method in ("aper", "ease"):
        workdir = str(tmp_path_factory.mktemp(method))
        out[method] = (run_lib.run(config_for(method), workdir), workdir)
    return out


def restored(workdir, phase):
    rs, saved = workdirs.restore(workdir, phase)
    return rs, jax.device_get(saved.state["params"]), jax.device_get(saved.method_state)


def initial_params(rs):
    """Phase 0's initial params, made as the run makes them (`phase.begin.start_variables`)."""
    info = PhaseInfo(0, 0, SIZES[0])
    model = phase_model.phase_model(rs.config, rs.method, info, num_classes=SIZES[0])
    key = phase_model.named_key(phase_model.phase_key(rs.config, 0), "init")
    return jax.device_get(phase_model.init_variables(model, rs.data.x_train[0], key)["params"])


def vit_features(rs, backbone, x, adapter_sets):
    """The ViT's [CLS] features (float64) with each of `adapter_sets` (None: no adapter), computed
    directly, in blocks of one shape (one compiled program per parameter tree)."""
    sets = len(backbone.get("adapter", {})) or 1
    vit = build_backbone("vit", **TINY, adapter=BOTTLENECK, adapter_sets=sets)
    n = len(x)
    x = np.concatenate([x, np.zeros((-n % BLOCK, *x.shape[1:]), x.dtype)])
    blocks = [
        _features(vit, tuple(adapter_sets), backbone, x[lo : lo + BLOCK], rs.data.norm)
        for lo in range(0, len(x), BLOCK)
    ]
    return [np.concatenate(f).astype(np.float64)[:n] for f in zip(*blocks, strict=True)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _features(vit, adapter_sets, backbone, x, norm):
    x = device.normalize(x, norm, jnp.float32)
    return [vit.apply({"params": backbone}, x, adapter_set=s) for s in adapter_sets]


def without_adapters(backbone):
    return {k: v for k, v in backbone.items() if k != "adapter"}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def by_phase(correct, labels):
    bounds = np.cumsum((0, *SIZES))
    return [
        correct[(labels >= lo) & (labels < hi)].mean()
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]


def assert_matches_accuracy(results, scores, labels):
    """The run's last accuracy row equals `scores`' argmax accuracy, up to near ties."""
    correct = scores.argmax(1) == labels
    top2 = np.sort(scores, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0] < 1e-5).astype(np.float64)
    gap = np.abs(np.asarray(results["accuracy_matrix"][-1]) - by_phase(correct, labels))
    assert np.all(gap <= np.asarray(by_phase(near_tie, labels)) + 1e-12), gap


def test_adapters_start_as_the_identity_and_leave_the_plain_vit_as_it_was(runs):
    """At initialisation the adapted features equal the pre-trained ones (the up-projections are
    zero); without adapters the ViT is the plain one: the same tree, the same numbers."""
    _, workdir = runs["aper"]
    rs, _, _ = restored(workdir, 0)
    backbone = initial_params(rs)["backbone"]
    up = backbone["adapter"]["set_0"]["encoderblock_0"]["up_kernel"]
    assert not np.any(up) and np.any(backbone["adapter"]["set_0"]["encoderblock_0"]["down_kernel"])
    off, on = vit_features(rs, backbone, rs.data.x_test, (None, 0))
    # The zero adapters add exactly 0, but XLA fuses the block's sums differently around them.
    np.testing.assert_allclose(on, off, atol=1e-6)
    plain = build_backbone("vit", **TINY)
    x = device.normalize(jnp.asarray(rs.data.x_test[:16]), rs.data.norm, jnp.float32)
    shapes = jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(without_adapters(backbone))
    reference = jax.jit(plain.apply)({"params": without_adapters(backbone)}, x)
    adapted = build_backbone("vit", **TINY, adapter=BOTTLENECK)
    without = jax.jit(functools.partial(adapted.apply, adapter_set=None))({"params": backbone}, x)
    np.testing.assert_array_equal(without, reference)


def test_aper_trains_only_adapters_and_head_in_phase_0(runs):
    _, workdir = runs["aper"]
    rs, first, _ = restored(workdir, 0)
    before = initial_params(rs)
    assert_trees_equal(without_adapters(first["backbone"]), without_adapters(before["backbone"]))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), first, before)
    assert all(jax.tree.leaves(changed["backbone"]["adapter"]["set_0"]["encoderblock_1"]))
    assert changed["head"]["kernel"] and changed["head"]["sigma"]
    for phase in (1, 2):
        _, params, _ = restored(workdir, phase)
        assert_trees_equal(params["backbone"], first["backbone"])  # frozen after phase 0


def test_aper_is_the_nearest_prototype_on_the_concatenated_features(runs):
    results, workdir = runs["aper"]
    rs, params, state = restored(workdir, len(SIZES) - 1)
    data = rs.data

    def feats(x):
        return np.concatenate(vit_features(rs, params["backbone"], x, (None, 0)), axis=1)

    train_feats = feats(data.x_train)
    protos = unit(np.stack([train_feats[data.y_train == c].mean(0) for c in range(10)]))
    np.testing.assert_allclose(state["class_means"], protos, atol=1e-5)
    scores = unit(feats(data.x_test)) @ protos.T
    assert_matches_accuracy(results, scores, data.y_test)
    assert results["last_accuracy"] > 2 / 10


def test_ease_adds_one_adapter_set_per_phase_and_keeps_the_old_ones(runs):
    _, workdir = runs["ease"]
    rs, _, _ = restored(workdir, 0)
    before = initial_params(rs)
    for phase in range(len(SIZES)):
        _, params, state = restored(workdir, phase)
        backbone, old = params["backbone"], before["backbone"]
        assert_trees_equal(without_adapters(backbone), without_adapters(old))
        assert set(backbone["adapter"]) == {f"set_{k}" for k in range(phase + 1)}
        for k in range(phase):
            assert_trees_equal(backbone["adapter"][f"set_{k}"], old["adapter"][f"set_{k}"])
        assert np.any(backbone["adapter"][f"set_{phase}"]["encoderblock_0"]["up_kernel"])
        num_old = sum(SIZES[:phase])
        kernel, old_kernel = params["head"]["kernel"], before["head"]["kernel"]
        np.testing.assert_array_equal(
            kernel[: old_kernel.shape[0], :num_old], old_kernel[:, :num_old]
        )
        assert state["prototypes"].shape == (num_old + SIZES[phase], 32 * (phase + 1))
        before = params


def completed_by_hand(real, phase_of, alpha):
    """EASE's completion, class by class: `real[c][j]` is class c's prototype in subspace j where
    it has one (j <= its phase); the others are filled from the classes that have both."""
    num_sets = max(phase_of.values()) + 1
    out = {c: dict(real[c]) for c in real}
    for c, i in phase_of.items():
        for j in range(i + 1, num_sets):
            refs = [r for r, p in phase_of.items() if p >= j]
            cos = np.array([unit(real[c][i]) @ unit(real[r][i]) for r in refs])
            weights = np.exp(cos) / np.exp(cos).sum()
            out[c][j] = sum(w * real[r][j] for w, r in zip(weights, refs, strict=True))
    scale = {c: [1.0 if j == i else alpha / (num_sets - 1) for j in range(num_sets)]
             for c, i in phase_of.items()}  # fmt: skip
    return out, scale


def test_ease_completes_old_prototypes_and_scores_by_the_formula(runs):
    results, workdir = runs["ease"]
    rs, params, state = restored(workdir, len(SIZES) - 1)
    data = rs.data
    bounds = np.cumsum((0, *SIZES))
    phase_of = {c: int(np.searchsorted(bounds, c, side="right") - 1) for c in range(10)}
    train_feats = vit_features(rs, params["backbone"], data.x_train, range(3))
    real = {
        c: {j: train_feats[j][data.y_train == c].mean(0) for j in range(phase_of[c] + 1)}
        for c in range(10)
    }
    protos, scale = completed_by_hand(real, phase_of, alpha=0.1)
    want = np.stack([np.concatenate([protos[c][j] for j in range(3)]) for c in range(10)])
    np.testing.assert_allclose(state["prototypes"], want, atol=1e-5)
    np.testing.assert_array_equal(state["class_phase"], [phase_of[c] for c in range(10)])
    test_feats = [unit(f) for f in vit_features(rs, params["backbone"], data.x_test, range(3))]
    scores = sum(
        (test_feats[j] @ unit(np.stack([protos[c][j] for c in range(10)])).T)
        * np.array([scale[c][j] for c in range(10)])
        for j in range(3)
    )
    assert_matches_accuracy(results, scores, data.y_test)
    assert results["last_accuracy"] > 2 / 10


def test_the_pretrained_vit_fills_the_vit_and_leaves_the_adapters(runs, tmp_path):
    """`model.pretrained` loads the ViT's part of `params/backbone`; the adapters beside it are no
    part of the checkpoint and keep their values."""
    from incremental.models import vit_weights

    _, workdir = runs["ease"]
    rs, params, _ = restored(workdir, 1)
    config = config_for("ease")
    given = jax.tree.map(lambda v: v + 1.0, without_adapters(params["backbone"]))
    config.model.pretrained = str(tmp_path / "given.npz")
    vit_weights.save_npz(config.model.pretrained, given)
    loaded = pretrained.with_backbone(config, {"params": params})["params"]["backbone"]
    assert_trees_equal(jax.device_get(without_adapters(loaded)), given)
    assert_trees_equal(loaded["adapter"], params["backbone"]["adapter"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="bottleneck"):
        methods.build("aper", {"bottleneck": 0})
    with pytest.raises(ValueError, match="alpha"):
        methods.build("ease", {"alpha": -1.0})
    with pytest.raises(ValueError, match="model.name must be 'vit'"):
        Aper().backbone(lambda **_: build_backbone("mlp"), PhaseInfo(0, 0, 2))
    with pytest.raises(ValueError, match="adapter_set 2"):
        vit = build_backbone("vit", **TINY, adapter=4)
        init = functools.partial(vit.init, adapter_set=2)
        jax.eval_shape(init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    assert methods.build("ease").learn_problem(2, True)  # its loss masks the known classes
    assert models.HEADS[methods.build("ease").head] is models.CosineHead
