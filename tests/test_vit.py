"""The ViT backbone and its checkpoints: timm's and big_vision's layouts give the model's numbers,
a checkpoint of another size is refused by path, prompts and prefixes reach the right layers, and a
run starts from the weights it is given."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import traverse_util
from safetensors.numpy import save_file

from configs import digits
from incremental import compilation, models, workdirs
from incremental import run as run_lib
from incremental.config import base_config
from incremental.models import build_backbone, vit_weights
from incremental.phase import pretrained

TINY = {"width": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "patch": 4}


def tiny(**fields):
    return build_backbone("vit", **{**TINY, **fields})


def init(model, shape=(2, 8, 8, 3), seed=0):
    with compilation.unrolled_threefry():  # eager: a sampler program per parameter shape
        return model.init(jax.random.PRNGKey(seed), jnp.zeros(shape), train=False)["params"]


def images(shape=(2, 8, 8, 3), seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# timm's ViT state dict, by name and shape (timm/models/vision_transformer.py: VisionTransformer
# with class_token, qkv_bias, global_pool='token'; Block = norm1, attn.{qkv,proj}, norm2,
# mlp.{fc1,fc2}). Linear weights are (out, in); the patch embedding is a Conv2d (D, C, p, p).
def timm_names(width, depth, mlp_dim, patch, channels, tokens, classes=5):
    d = width
    names = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, tokens, d),
        "patch_embed.proj.weight": (d, channels, patch, patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (classes, d),
        "head.bias": (classes,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        names.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (mlp_dim, d), b + "mlp.fc1.bias": (mlp_dim,),
            b + "mlp.fc2.weight": (d, mlp_dim), b + "mlp.fc2.bias": (d,),
        })  # fmt: skip
    return names


def random_timm(path, seed=0, **dims):
    rng = np.random.default_rng(seed)
    tensors = {
        name: (rng.normal(size=shape) * (0.5 if "norm" not in name else 0.2)).astype(np.float32)
        for name, shape in timm_names(**dims).items()
    }
    for name in tensors:  # LayerNorm scales near 1, as trained ones are
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            tensors[name] += 1.0
    save_file(tensors, str(path))
    return tensors


def numpy_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def numpy_timm_features(w, x_BxCxHxW, depth, heads):
    """timm's forward pass (float64): conv patch embedding, [CLS], positions, pre-LN blocks with a
    fused qkv, exact GELU, final norm, token 0."""
    p = w["patch_embed.proj.weight"].shape[-1]
    b, c, h, wd = x_BxCxHxW.shape
    patches = x_BxCxHxW.reshape(b, c, h // p, p, wd // p, p)
    x = np.einsum("bcyixj,dcij->byxd", patches, w["patch_embed.proj.weight"])
    x = x.reshape(b, -1, x.shape[-1]) + w["patch_embed.proj.bias"]
    cls = np.broadcast_to(w["cls_token"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1) + w["pos_embed"]
    n, d = x.shape[1], x.shape[2]
    for i in range(depth):
        g = lambda name, i=i: w[f"blocks.{i}.{name}"]  # noqa: E731
        y = numpy_layer_norm(x, g("norm1.weight"), g("norm1.bias"))
        qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, H, N, D / H)
        scores = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + y @ g("attn.proj.weight").T + g("attn.proj.bias")
        y = numpy_layer_norm(x, g("norm2.weight"), g("norm2.bias"))
        y = y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        y = 0.5 * y * (1.0 + scipy.special.erf(y / np.sqrt(2.0)))
        x = x + y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    return numpy_layer_norm(x, w["norm.weight"], w["norm.bias"])[:, 0]


def test_timm_safetensors_gives_timms_features(tmp_path):
    path = tmp_path / "model.safetensors"
    dims = {"width": 32, "depth": 2, "mlp_dim": 64, "patch": 4, "channels": 3, "tokens": 5}
    tensors = random_timm(path, **dims)
    model = tiny(gelu="erf")
    params, recipe = vit_weights.load(str(path), init(model))
    assert (recipe.layout, recipe.gelu) == ("timm", "erf")
    assert recipe.mean == vit_weights.IMAGENET_MEAN and recipe.std == vit_weights.IMAGENET_STD
    assert recipe.dropped == ("head.bias", "head.weight")
    x = images()
    features = model.apply({"params": params}, x, train=False)
    w64 = {k: v.astype(np.float64) for k, v in tensors.items()}
    expected = numpy_timm_features(w64, np.asarray(x, np.float64).transpose(0, 3, 1, 2), 2, 4)
    np.testing.assert_allclose(np.asarray(features), expected, rtol=1e-5, atol=1e-6)


def test_timm_normalisation_comes_from_the_config_beside_the_weights(tmp_path):
    path = tmp_path / "model.safetensors"
    random_timm(path, width=32, depth=2, mlp_dim=64, patch=4, channels=3, tokens=5)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"architecture": "vit_tiny", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
        )
    )
    assert vit_weights.recipe(str(path)).mean == (0.5, 0.5, 0.5)


def test_vision_transformer_npz_loads_back_bit_for_bit(tmp_path):
    model = tiny()
    params = init(model, seed=3)
    path = str(tmp_path / "vit.npz")
    vit_weights.save_npz(path, params)
    with np.load(path) as f:  # the file's names are the published checkpoints'
        assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in f.files
        assert "Transformer/posembed_input/pos_embedding" in f.files
    loaded, recipe = vit_weights.load(path, init(model, seed=4))
    assert (recipe.layout, recipe.mean, recipe.gelu) == ("vision_transformer", (0.5,) * 3, "tanh")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))


def big_vision_layout(params):
    """The same model in big_vision's layout: linen numbering, a scanned encoder under `params/`,
    positions at the top without a [CLS] row (so [CLS] carries its row)."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    posemb = flat.pop("Transformer/posembed_input/pos_embedding")
    out = {"params/pos_embedding": posemb[:, 1:], "params/cls": flat.pop("cls") + posemb[:, :1]}
    linen = {v: k for k, v in vit_weights.LINEN_NAMES.items()}
    stacked = {}
    for key, value in flat.items():
        parts = key.split("/")
        if parts[1].startswith("encoderblock_"):
            rest = "/".join([linen.get(parts[2], parts[2]), *parts[3:]])
            stacked.setdefault(rest, []).append(value)
        else:
            out[f"params/{key}"] = value
    out.update({f"params/Transformer/encoderblock/{k}": np.stack(v) for k, v in stacked.items()})
    out["params/head/kernel"] = np.zeros((32, 10), np.float32)
    return out


def test_big_vision_npz_computes_the_same_features(tmp_path):
    model = tiny()
    params = init(model, seed=5)
    path = str(tmp_path / "bv.npz")
    np.savez(path, **big_vision_layout(params))
    loaded, recipe = vit_weights.load(path, init(model))
    assert recipe.layout == "big_vision" and recipe.dropped == ("params/head/kernel",)
    x = images()
    np.testing.assert_array_equal(
        model.apply({"params": loaded}, x), model.apply({"params": params}, x)
    )


@pytest.mark.parametrize(
    "other, first",
    [
        ({"depth": 3}, "Transformer/encoderblock_2/LayerNorm_0/scale is in the checkpoint but not"),
        ({"width": 48}, r"embedding/kernel has shape \(4, 4, 3, 48\), the model's \(4, 4, 3, 32\)"),
    ],
)
def test_a_checkpoint_of_another_size_is_refused_naming_the_first_mismatch(tmp_path, other, first):
    path = str(tmp_path / "other.npz")
    vit_weights.save_npz(path, init(tiny(**other)))
    dims = {**TINY, **other}
    fix = f"model.kwargs.width={dims['width']}, depth={dims['depth']}, heads=4, mlp_dim=64, patch=4"
    with pytest.raises(ValueError, match=first) as error:
        vit_weights.load(path, init(tiny()))
    assert fix in str(error.value)


def test_a_timm_checkpoint_of_another_depth_is_refused_by_its_timm_name(tmp_path):
    path = tmp_path / "deep.safetensors"
    random_timm(path, width=32, depth=3, mlp_dim=64, patch=4, channels=3, tokens=5)
    with pytest.raises(
        ValueError, match=r"encoderblock_2/LayerNorm_0/scale \(blocks.2.norm1.weight"
    ):
        vit_weights.load(str(path), init(tiny(gelu="erf")))


def test_the_presets_are_named_in_the_advice():
    shapes = jax.eval_shape(lambda: init(build_backbone("vit", size="b"), (1, 224, 224, 3)))
    flat = traverse_util.flatten_dict(shapes, sep="/")
    assert vit_weights.describe(flat).endswith("(ViT-B/16)")
    assert vit_weights.advice(flat).startswith("model.kwargs.size='b'")
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)


def test_another_image_size_resamples_the_position_grid(tmp_path):
    path = str(tmp_path / "small.npz")
    vit_weights.save_npz(path, init(tiny()))  # 2x2 patches
    loaded, recipe = vit_weights.load(path, init(tiny(), (1, 16, 16, 3)))  # 4x4 patches
    assert recipe.resized == ("Transformer/posembed_input/pos_embedding",)
    assert loaded["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 32)


def block_outputs(model, params, x, **extras):
    _, state = model.apply(
        {"params": params}, x, capture_intermediates=True, mutable=["intermediates"], **extras
    )
    encoder = state["intermediates"]["Transformer"]
    return [np.asarray(encoder[f"encoderblock_{i}"]["__call__"][0]) for i in range(3)]


def test_no_prompts_and_no_prefixes_change_nothing():
    model = tiny(depth=3)
    params, x = init(model), images()
    plain = model.apply({"params": params}, x)
    width = TINY["width"]
    empty = jnp.zeros((2, 0, width))
    for extras in ({"prompts": None, "prefixes": None}, {"prefixes": {}}, {"prompts": empty}):
        np.testing.assert_array_equal(model.apply({"params": params}, x, **extras), plain)
    np.testing.assert_array_equal(
        model.apply({"params": params}, x, prefixes={1: (empty, empty)}), plain
    )


def test_a_prefix_in_layer_k_changes_only_layers_k_on():
    model = tiny(depth=3)
    params, x = init(model), images()
    prefix = tuple(jax.random.normal(jax.random.PRNGKey(i), (2, 3, TINY["width"])) for i in (7, 8))
    plain = block_outputs(model, params, x)
    for k in range(3):
        prefixed = block_outputs(model, params, x, prefixes={k: prefix})
        for layer in range(3):
            if layer < k:
                np.testing.assert_array_equal(prefixed[layer], plain[layer])
            else:  # every token attends to the prefix
                assert (np.abs(prefixed[layer] - plain[layer]).max(axis=-1) > 1e-6).all()


def test_prompts_go_in_front_of_cls():
    model = tiny()
    params, x = init(model), images()
    prompts = jax.random.normal(jax.random.PRNGKey(9), (2, 3, TINY["width"]))
    tokens = model.apply({"params": params}, x, prompts=prompts, tokens=True)
    assert tokens.shape == (2, 3 + 1 + 4, TINY["width"])
    features = model.apply({"params": params}, x, prompts=prompts)
    np.testing.assert_array_equal(features, tokens[:, 3])
    assert not np.allclose(features, model.apply({"params": params}, x))


@pytest.mark.parametrize(
    "extras, message",
    [
        ({"prefixes": {2: (jnp.zeros((2, 1, 32)),) * 2}}, r"layers \[2\], but the blocks are 0..1"),
        ({"prefixes": {0: (jnp.zeros((2, 1, 16)),) * 2}}, "each shaped"),
        ({"prompts": jnp.zeros((2, 32))}, "prompts must be shaped"),
    ],
)
def test_wrong_extras_are_refused(extras, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model.apply({"params": init(model)}, images(), **extras)


def test_bfloat16_compute_keeps_float32_params():
    model = tiny(dtype=jnp.bfloat16)
    params = init(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert model.apply({"params": params}, images()).dtype == jnp.bfloat16


def test_the_run_refuses_weights_it_cannot_use(tmp_path):
    config = base_config()
    config.model.pretrained = str(tmp_path / "model.safetensors")
    random_timm(
        config.model.pretrained, width=32, depth=2, mlp_dim=64, patch=4, channels=3, tokens=5
    )
    target = init(tiny())
    with pytest.raises(ValueError, match="model.name is 'mlp'; set model.name=vit"):
        pretrained.load_backbone(config, target)
    config.model.name, config.model.kwargs = "vit", TINY
    with pytest.raises(ValueError, match="set model.kwargs.gelu='erf'"):  # timm trains with erf
        pretrained.load_backbone(config, target)
    config.model.kwargs.gelu = "erf"
    assert pretrained.load_backbone(config, target)[1].layout == "timm"


def test_gray_images_get_the_weights_normalisation(tmp_path):
    config = base_config()
    config.model.pretrained = str(tmp_path / "w.npz")
    vit_weights.save_npz(config.model.pretrained, init(tiny()))
    norm = pretrained.normalizer(config, np.zeros((4, 8, 8, 1), np.uint8), is_image=True)
    np.testing.assert_array_equal(norm.mean, np.full((1, 1, 1, 1), 127.5, np.float32))
    np.testing.assert_array_equal(norm.std, norm.mean)


def test_a_run_starts_from_the_pretrained_backbone(tmp_path):
    """3 phases of digits on a tiny ViT whose backbone is read from a file and frozen: after phase
    0 it is the file's weights exactly, the head is new, and the inputs were normalised to [-1, 1]
    by the file's constants rather than the data's statistics."""
    config = digits.get_config("model=vit")
    config.model.kwargs = {**TINY, "heads": 2, "resize": 16}
    config.protocol.phase_sizes = "4,3,3"
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.train.freeze = (("backbone/.*", True),)
    config.log.progress = config.log.plot = False
    given = init(tiny(heads=2, resize=16), (1, 8, 8, 1), seed=11)
    config.model.pretrained = str(tmp_path / "given.npz")
    vit_weights.save_npz(config.model.pretrained, given)
    workdir = str(tmp_path / "run")
    results = run_lib.run(config, workdir)
    assert results["complete"] and len(results["accuracy_matrix"]) == 3
    rs, saved = workdirs.restore(workdir, 0)
    backbone = saved.state["params"]["backbone"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(backbone), jax.device_get(given))
    assert saved.state["params"]["head"]["kernel"].shape[0] == TINY["width"]
    np.testing.assert_array_equal(rs.data.norm.mean.ravel(), [8.0])  # 0.5 of digits' white, 16


def test_center_crop_is_resize_then_the_central_square_and_leaves_crops_alone():
    """center_crop 0.875 at 224: torchvision's Resize(256) + CenterCrop(224) (offset 16), in the
    given interpolation; an input already 224 x 224 (a training crop) passes unchanged."""
    vit = models.ViT(resize=224, center_crop=224 / 256, interpolation="cubic")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    big = jax.image.resize(jnp.asarray(x), (2, 256, 256, 3), "cubic")
    np.testing.assert_array_equal(vit.resized(jnp.asarray(x)), big[:, 16:240, 16:240])
    crop = jnp.ones((2, 224, 224, 3))
    assert vit.resized(crop) is crop
    plain = models.ViT(resize=16)
    np.testing.assert_array_equal(
        plain.resized(jnp.asarray(x)), jax.image.resize(jnp.asarray(x), (2, 16, 16, 3), "linear")
    )
    with pytest.raises(ValueError, match="center_crop"):
        models.ViT(resize=16, center_crop=1.5).resized(jnp.asarray(x))
