"""Tests for incremental.models: shapes, parameter trees and counts, BatchNorm modes, dtypes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from incremental import surgery
from incremental.methods import l2p
from incremental.models import (
    MODELS,
    BasicBlock,
    build_model,
    cross_entropy,
    head_logits,
    layers,
    mask_unseen,
    vit,
)

# name -> (kwargs, input shape, feature dim): tiny variants so every model compiles fast.
TINY = {
    "mlp": ({"hidden": [16, 8]}, (4, 8, 8, 1), 8),
    "convnet": ({"channels": (4, 8), "dense": 16}, (4, 8, 8, 1), 16),
    "resnet32": ({"depth": 8}, (4, 8, 8, 3), 64),
    "resnet18": ({"small_input": True}, (4, 8, 8, 3), 512),
}
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _inputs(shape):
    """Inputs drawn by numpy: XLA:CPU compiles jax.random's sampler of a 4-D shape for seconds."""
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


def _init(model, shape):
    x = _inputs(shape)
    return model.init(jax.random.key(0), x, train=False), x


@functools.cache
def _tiny(name: str):
    """Returns (model, variables, x) for TINY[name], initialised once per test session."""
    kwargs, shape, _ = TINY[name]
    model = build_model(name, NUM_CLASSES, **kwargs)
    x = _inputs(shape)
    # One compiled init with the "rbg" generator: threefry makes XLA compile time dominate.
    init_fn = jax.jit(functools.partial(model.init, train=False))
    return model, init_fn(jax.random.key(0, impl="rbg"), x), x


def _num_params(name: str, num_classes: int, shape, **kwargs) -> int:
    model = build_model(name, num_classes, **kwargs)
    x = jnp.zeros(shape, jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def _trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))


@pytest.mark.parametrize("name", sorted(TINY))
def test_shapes_and_param_tree(name):
    model, variables, x = _tiny(name)
    shape, dim = x.shape, TINY[name][2]
    params = variables["params"]
    assert set(params) == {"backbone", "head"}
    assert set(params["head"]) == {"kernel", "bias"}
    assert params["head"]["kernel"].shape == (dim, NUM_CLASSES)
    assert params["head"]["bias"].shape == (NUM_CLASSES,)
    for train in (True, False):
        apply = jax.jit(functools.partial(model.apply, train=train, mutable=["batch_stats"]))
        (feats, logits), _ = apply(variables, x)
        assert feats.shape == (shape[0], dim) and feats.dtype == jnp.float32
        assert logits.shape == (shape[0], NUM_CLASSES) and logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all()
        # Widening the head relies on logits being reproducible from features alone.
        np.testing.assert_array_equal(head_logits(feats, params["head"]), logits)


def test_resnet18_imagenet_stem_shapes():
    # Abstract evaluation only: a real init of ResNet-18 costs seconds of compilation.
    model = build_model("resnet18", NUM_CLASSES)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

    def init_apply(x):
        variables = model.init(jax.random.key(0), x, train=False)
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    feats, logits = jax.eval_shape(init_apply, x)
    assert feats.shape == (2, 512) and logits.shape == (2, NUM_CLASSES)


def _widen(params, num_new: int):
    head = params["head"]
    kernel = jax.random.normal(jax.random.key(7), (head["kernel"].shape[0], num_new))
    wide = {
        "kernel": jnp.concatenate([head["kernel"], kernel], axis=1),
        "bias": jnp.concatenate([head["bias"], jnp.ones((num_new,))]),
    }
    return {**params, "head": wide}


@pytest.mark.parametrize("jit", [False, True])
def test_widened_head_keeps_old_logits_bit_identical(jit):
    old = 10
    x = jax.random.normal(jax.random.key(2), (32, 24), jnp.float32)
    model = build_model("mlp", old, hidden=(64,))
    params = model.init(jax.random.key(0), x, train=False)["params"]
    for new in (1, 119, 300):  # within and across column blocks of 128
        wide_model = build_model("mlp", old + new, hidden=(64,))
        apply_fns = [m.apply for m in (model, wide_model)]
        if jit:
            apply_fns = [jax.jit(fn, static_argnames="train") for fn in apply_fns]
        logits = apply_fns[0]({"params": params}, x, train=False)[1]
        wide = apply_fns[1]({"params": _widen(params, new)}, x, train=False)[1]
        assert wide.shape == (32, old + new)
        np.testing.assert_array_equal(wide[:, :old], logits)


def test_cross_entropy_is_optaxs_and_ignores_masked_columns():
    rng = np.random.default_rng(0)
    for num_classes, num_seen in [(10, 4), (100, 30), (300, 130)]:
        logits = jnp.asarray(rng.normal(size=(16, num_classes)).astype(np.float32) * 4)
        labels = jnp.asarray(rng.integers(0, num_seen, 16))
        narrow = cross_entropy(logits[:, :num_seen], labels)
        expected = optax.softmax_cross_entropy_with_integer_labels(logits[:, :num_seen], labels)
        np.testing.assert_allclose(narrow, expected, rtol=1e-6)
        wide = cross_entropy(mask_unseen(logits, num_seen), labels)
        np.testing.assert_array_equal(np.asarray(wide), np.asarray(narrow))


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [("mlp", {"hidden": (64,)}, (8, 8, 1)), ("resnet32", {"depth": 8}, (16, 16, 3))],
)
def test_a_wider_masked_head_gives_the_narrow_heads_gradients_bit_for_bit(name, kwargs, shape):
    """What head.capacity relies on: the head, its bias and the loss reduce in fixed blocks."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 64))
    narrow, wide = build_model(name, 10, **kwargs), build_model(name, 100, **kwargs)
    init = jax.jit(functools.partial(narrow.init, train=False))
    variables = init(jax.random.key(0, impl="rbg"), x[:1])  # rbg: see _tiny
    params = variables["params"]
    wide_params = surgery.widen_head(params, 90, None, "zeros")

    def grads(model, params, num_seen=None):
        def loss(params):
            (_, logits), _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            logits = logits if num_seen is None else mask_unseen(logits, num_seen)
            return cross_entropy(logits, y).mean()

        return jax.jit(jax.grad(loss))(params)

    g_narrow, g_wide = grads(narrow, params), grads(wide, wide_params, 10)
    g_wide = surgery.narrow_head(g_wide, 10)
    for a, b in zip(jax.tree.leaves(g_narrow), jax.tree.leaves(g_wide), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_head_matches_dense_math():
    feats = jax.random.normal(jax.random.key(3), (5, 16), jnp.float32)
    head = {"kernel": jax.random.normal(jax.random.key(4), (16, 300)), "bias": jnp.ones((300,))}
    expected = np.asarray(feats, np.float64) @ np.asarray(head["kernel"], np.float64) + 1.0
    np.testing.assert_allclose(head_logits(feats, head), expected, rtol=1e-5, atol=1e-5)


def test_mlp_has_no_batch_stats_and_tolerates_mutable():
    model = build_model("mlp", NUM_CLASSES, hidden=(8,))
    variables, x = _init(model, (3, 7))
    assert not variables.get("batch_stats")
    (_, logits), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (3, NUM_CLASSES)
    assert not updates.get("batch_stats")


def test_resnet32_param_count_is_pycils():
    """PyCIL's resnet32 (convs/cifar_resnet.py, option-A shortcuts), counted from its definition:
    stem conv 3*16*9 = 432 + BN 32; stage 1, 5 blocks of 2 * 16*16*9 + 2 * 32 = 4,672 -> 23,360;
    stage 2, 32*16*9 + 32*32*9 + 2 * 64 = 13,952, then 4 * (2 * 32*32*9 + 128) = 74,240 -> 88,192;
    stage 3, 64*32*9 + 64*64*9 + 2 * 128 = 55,552, then 4 * (2 * 64*64*9 + 256) = 295,936 -> 351,488.
    Backbone 463,504; with a 100-class head (64 * 100 + 100 = 6,500) 470,004."""
    assert _num_params("resnet32", 100, (1, 32, 32, 3)) == 470_004
    # Option B adds two 1x1 projections with BN: 16*32 + 64 + 32*64 + 128 = 2,752 parameters.
    assert _num_params("resnet32", 100, (1, 32, 32, 3), shortcut="B") == 470_004 + 2_752


@pytest.mark.parametrize("shortcut, projections", [("A", 0), ("B", 2)])
def test_resnet32_conv_layers(shortcut, projections):
    model = build_model("resnet32", 100, shortcut=shortcut)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
    kernels = [k for k in jax.tree.leaves(params["backbone"]) if k.ndim == 4]
    assert sum(k.shape[:2] == (3, 3) for k in kernels) == 31
    assert sum(k.shape[:2] == (1, 1) for k in kernels) == projections


def test_option_a_shortcut_is_the_subsampled_identity_padded_with_zeros():
    """PyCIL's DownsampleA: AvgPool2d(kernel 1, stride 2), then cat((x, x * 0), channels)."""
    block = BasicBlock(32, 2, shortcut="A")
    # Inputs from numpy: XLA:CPU compiles a sampler of a rank-4 shape for seconds.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 16)), jnp.float32)
    variables = jax.jit(functools.partial(block.init, train=False))(jax.random.key(1), x)
    # With the residual branch's last BN scaled to zero, the block is relu(shortcut(x)).
    bn2 = variables["params"]["bn2"]
    zeroed = {**variables["params"], "bn2": {**bn2, "scale": jnp.zeros_like(bn2["scale"])}}
    out = block.apply({**variables, "params": zeroed}, x, train=False)
    expected = np.concatenate([np.asarray(x)[:, ::2, ::2], np.zeros((2, 4, 4, 16))], axis=-1)
    np.testing.assert_allclose(np.asarray(out), np.maximum(expected, 0), atol=1e-6)


def test_resnet18_param_count_matches_torchvision():
    assert _num_params("resnet18", 1000, (1, 224, 224, 3)) == 11_689_512
    # Small-input stem: 3x3x3x64 instead of 7x7x3x64 weights.
    small = _num_params("resnet18", 1000, (1, 32, 32, 3), small_input=True)
    assert small == 11_689_512 - (7 * 7 - 3 * 3) * 3 * 64


def test_conv_init_is_kaiming_fan_out():
    _, variables, _ = _tiny("resnet32")
    kernel = variables["params"]["backbone"]["stage3_block0"]["conv2"]["kernel"]
    expected_std = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(float(jnp.std(kernel)) / expected_std - 1.0) < 0.05


@pytest.mark.parametrize(
    "drawn, flax_init, shapes",
    [
        (
            layers.KAIMING_FAN_OUT,
            nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            [(3, 3, 2, 4), (1, 1, 8, 4)],
        ),
        (layers.LECUN_NORMAL_CONV, nn.initializers.lecun_normal(), [(2, 3, 3, 4)]),
        (layers.lecun_normal_row, nn.initializers.lecun_normal(), [(64, 3), (5, 1)]),
        (vit.POSITION_INIT, nn.initializers.normal(0.02), [(1, 17, 32)]),
        (l2p.uniform_init, functools.partial(jax.random.uniform, minval=-1.0), [(2, 3, 2, 4)]),
    ],
)
def test_kernels_drawn_in_fewer_axes_are_flaxs_draws_bit_for_bit(drawn, flax_init, shapes):
    """The conv kernels' initializers draw a matrix and reshape it, the position embeddings' and
    prompts' a vector (XLA:CPU compiles those several times faster); the numbers are flax's for the
    parameter's own shape, in one jitted init. The shapes are small, with unequal axes: flax's
    sampler of a (3, 3, 8, 16) kernel alone compiles for 3.5 s."""
    keys = list(jax.random.split(jax.random.PRNGKey(4), len(shapes)))

    def draw_all(init):
        return jax.jit(lambda keys: [init(k, s) for k, s in zip(keys, shapes, strict=True)])

    for a, b, shape in zip(draw_all(drawn)(keys), draw_all(flax_init)(keys), shapes, strict=True):
        assert a.shape == shape and a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_resnet32_rejects_bad_depth():
    model = build_model("resnet32", NUM_CLASSES, depth=30)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        _init(model, (1, 8, 8, 3))


def test_conv_models_reject_flat_input():
    model = build_model("convnet", NUM_CLASSES, channels=(4,), dense=8)
    with pytest.raises(ValueError, match="B, H, W, C"):
        _init(model, (2, 64))


def test_batch_stats_update_only_in_train_mode():
    model, variables, x = _tiny("convnet")
    x = 3.0 * x + 1.0  # statistics far from the initial mean 0, variance 1
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not _trees_equal(updates["batch_stats"], variables["batch_stats"])
    _, same = model.apply(variables, x, train=False, mutable=["batch_stats"])
    assert _trees_equal(same["batch_stats"], variables["batch_stats"])


def test_eval_mode_ignores_other_batch_elements():
    model, variables, x = _tiny("resnet32")
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    other = x.at[1:].set(5.0 * x[1:] - 2.0)
    eval_a = model.apply(variables, x, train=False)[1][0]
    eval_b = model.apply(variables, other, train=False)[1][0]
    np.testing.assert_allclose(eval_a, eval_b, rtol=1e-6, atol=1e-6)
    # Train mode does use batch statistics, so the same change moves element 0.
    train_a = model.apply(variables, x, train=True, mutable=["batch_stats"])[0][1][0]
    train_b = model.apply(variables, other, train=True, mutable=["batch_stats"])[0][1][0]
    assert not np.allclose(train_a, train_b)


def test_bf16_compute_keeps_float32_params_and_logits():
    _, variables, x = _tiny("resnet32")
    model = build_model("resnet32", NUM_CLASSES, depth=8, dtype=jnp.bfloat16)
    init_fn = functools.partial(model.init, train=False)
    abstract = jax.eval_shape(init_fn, jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    (feats, logits), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert feats.dtype == jnp.float32 and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_dtype_accepts_config_strings():
    model = build_model("convnet", NUM_CLASSES, dtype="bfloat16", channels=[4])
    assert model.backbone.dtype == jnp.bfloat16 and model.backbone.channels == (4,)


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="valid names are .*resnet32"):
        build_model("resnet33", NUM_CLASSES)


def test_build_model_unknown_kwarg():
    with pytest.raises(ValueError, match="'widths'.*valid fields are .*'hidden'"):
        build_model("mlp", NUM_CLASSES, widths=(8,))


@pytest.mark.parametrize("num_classes", [0, -1, 2.0])
def test_build_model_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", num_classes)


def test_registry_names():
    assert set(MODELS) == {"mlp", "convnet", "resnet32", "resnet18", "vit"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_last_relu_false_gives_the_features_before_the_final_relu(name):
    """LUCIR's backbone: the same parameters, features that can be negative (for the ResNets the
    ReLU dropped is before the global pooling, so only the dense backbones give relu(raw) = usual)."""
    with_relu, variables, x = _tiny(name)
    without = build_model(name, NUM_CLASSES, **TINY[name][0], last_relu=False)
    feats = jax.jit(functools.partial(with_relu.apply, train=False))(variables, x)[0]
    raw = jax.jit(functools.partial(without.apply, train=False))(variables, x)[0]
    assert float(raw.min()) < 0 <= float(feats.min())
    if name in ("mlp", "convnet"):
        np.testing.assert_allclose(np.asarray(jnp.maximum(raw, 0)), np.asarray(feats), atol=1e-6)
