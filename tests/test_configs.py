"""The published-protocol configs run end to end on tfds mock data with a shrunk schedule."""

import pytest
import tensorflow_datasets as tfds

from configs import cifar100, imagenet100
from incremental import methods
from incremental import run as run_lib
from incremental.phase import load


def shrink(config, phase_sizes: str):
    config.protocol.phase_sizes = phase_sizes
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.train.batch_size = 16
    config.log.progress = config.log.plot = False
    return config


def test_cifar100_config_runs_on_mock_data(tmp_path):
    for protocol, init in (("b0_inc10", 0), ("b50_inc10", 50)):
        config = cifar100.get_config(f"method=finetune,protocol={protocol}")
        assert config.model.name == "resnet32" and config.train.batch_size == 128
        assert config.train_first.milestones == (60, 120, 170)
        assert (config.protocol.init_classes, config.protocol.increment) == (init, 10)
    # Both protocols run through the same code once their phases are set; one run checks it.
    config = shrink(config, "50,50")  # 2 phases so every phase has mock examples
    config.model.kwargs = {"depth": 8}  # the same family, small enough for CI
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        results = run_lib.run(config, str(tmp_path))
    assert results["complete"] and results["dataset"] == "tfds:cifar100"
    assert [len(p["classes"]) for p in results["phases"]] == [50, 50]


def test_every_method_validates_from_the_cifar100_config_or_names_the_vit_it_needs(tmp_path):
    """Config, method, mock data, protocol and the ResNet together, up to the run itself
    (`load.validate`), for every method; the ViT methods refuse the ResNet with their reason."""
    needs_vit = {"l2p", "dualprompt", "coda_prompt", "aper", "ease"}
    with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
        for method in sorted(methods.METHODS):
            config = shrink(cifar100.get_config(f"method={method}"), "5,5")
            config.dataset.classes = "seeded:10"
            config.model.kwargs = {"depth": 8}
            workdir = str(tmp_path / method)
            if method in needs_vit:
                with pytest.raises(ValueError, match="model.name must be 'vit'"):
                    load.validate(config, workdir)
            else:
                assert load.validate(config, workdir)[2].name == method


# Runs of one method of each kind that ResNet changes: importances through BatchNorm (ewc), a cosine
# head on a ResNet without its last ReLU (lucir), a ResNet split in shared and per-phase parts
# (memo). Teachers with BatchNorm (bic, der, foster) run from this config in tests/test_reproduce.py;
# the rest share these code paths, validate above, and run end to end on digits in their own tests.
# 20-40 s each, most of it compiling ResNet programs: the full suite runs them (`slow`).
@pytest.mark.slow
@pytest.mark.parametrize("method", ["ewc", "lucir", "memo"])
def test_every_method_runs_from_the_cifar100_config(tmp_path, method):
    config = shrink(cifar100.get_config(f"method={method}"), "5,5")
    config.dataset.classes = "seeded:10"  # 10 of the mock data's 100 classes, ~10 examples each
    config.model.kwargs = {"depth": 8}
    config.train_first.epochs = config.train.epochs = 1
    with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
        results = run_lib.run(config, str(tmp_path))
    assert results["complete"] and results["method"] == method


def test_imagenet100_config_selects_100_classes():
    config = imagenet100.get_config("protocol=b50_inc10")
    assert config.dataset.classes == "seeded:100" and config.model.name == "resnet18"
    assert (config.protocol.init_classes, config.protocol.increment) == (50, 10)


def test_unknown_protocol_arg_is_named():
    with pytest.raises(ValueError, match="Unknown protocol 'b10'"):
        cifar100.get_config("protocol=b10")


def test_foster_cifar100_config_is_the_official_codes():
    """G-U-N/ECCV22-FOSTER at 555c7f0: Cutout(16) in utils/data.py, beta1 per phase in
    configs/cifar/b0inc10.json; the B50 protocol keeps PyCIL's foster.json beta1."""
    b0 = cifar100.get_config("method=foster")
    assert b0.augment.cutout == 16 and cifar100.get_config("method=icarl").augment.cutout == 0
    assert b0.augment.autoaugment == "cifar10"
    assert b0.method_args.beta1 == (0.98, 0.975, 0.97, 0.965, 0.96, 0.955, 0.95, 0.945, 0.94)
    b50 = cifar100.get_config("method=foster,protocol=b50_inc10")
    assert b50.method_args.beta1 == 0.96 and b50.augment.cutout == 16


def test_cifar100_reference_settings():
    """PyCIL's (87cc411) settings where they differ from the method files' paper defaults."""
    bic = cifar100.get_config("method=bic")  # models/bic.py lines 12-19, every phase and stage 2
    for section in (bic.train, bic.train_first):
        assert (section.epochs, section.milestones, section.weight_decay) == (
            170,
            (60, 100, 140),
            2e-4,
        )
    assert (bic.method_args.bias_epochs, bic.method_args.bias_milestones) == (170, (60, 100, 140))
    assert bic.method_args.bias_stage == "pycil"
    paper = cifar100.get_config("method=bic,schedule=paper")
    assert (paper.train_first.epochs, paper.method_args.bias_milestones) == (250, (100, 150, 200))
    with pytest.raises(ValueError, match="'paper' \\(bic only\\)"):
        cifar100.get_config("method=icarl,schedule=paper")
    ewc = cifar100.get_config("method=ewc").method_args  # models/ewc.py: the method's defaults
    assert (ewc.strength, ewc.fisher, ewc.fisher_max, ewc.accumulate, ewc.loss_classes) == (
        1000.0,
        "batch",
        1e-4,
        "average",
        "new",
    )
    config = cifar100.get_config()  # utils/data.py iCIFAR100.train_trsf, convs/cifar_resnet.py
    assert config.augment.brightness == pytest.approx(63 / 255)
    assert config.model.kwargs.to_dict() == {}  # resnet32 with its default, option-A shortcuts
    assert cifar100.get_config("method=memo").method_args.train_shared  # exps/memo.json train_base


def test_the_vit_cifar100_config_runs_a_prompt_method_from_a_checkpoint(tmp_path):
    """configs/vit_cifar100.py's keys work together: L2P on mock CIFAR-100 from a ViT checkpoint
    (shrunk: 10 classes, a 1-block ViT at 32 px, float32 on CPU)."""
    import jax
    import jax.numpy as jnp

    from configs import vit_cifar100
    from incremental.models import build_backbone, vit_weights

    config = shrink(vit_cifar100.get_config("method=l2p,weights=w.npz"), "5,5")
    assert config.model.kwargs.resize == 224 and config.train.optimizer == "adam"
    # PILOT's utils/data.py build_transform: RandomResizedCrop(224, scale=(0.05, 1.0)) and a flip.
    assert (config.augment.resized_crop, config.augment.resized_crop_scale) == (224, (0.05, 1.0))
    assert config.augment.flip and not config.augment.brightness
    tiny = {"width": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "patch": 8, "resize": 32}
    config.augment.resized_crop = 32  # the tiny model's side: the train step crops on the device
    config.model.kwargs = {**tiny, "gelu": "tanh"}
    config.dataset.classes = "seeded:10"
    config.dtype = "float32"
    config.method_args.update({"pool_size": 4, "length": 2, "top_n": 2})
    weights = build_backbone("vit", **tiny).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False
    )["params"]
    config.model.pretrained = str(tmp_path / "w.npz")
    vit_weights.save_npz(config.model.pretrained, weights)
    with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE):
        results = run_lib.run(config, str(tmp_path / "run"))
    assert results["complete"] and results["method"] == "l2p"


@pytest.mark.parametrize("name", ["vit_cifar100", "vit_imagenet_r", "vit_cub200"])
def test_the_pretrained_vit_configs_build_and_validate_for_every_method(name):
    """Each pre-trained-ViT config passes the schema for each of its methods, trains on PILOT's
    224-px random resized crops, and evaluates 224-px images (the model's resize)."""
    import importlib

    from incremental import schema

    module = importlib.import_module(f"configs.{name}")
    for method in ("simplecil", "ranpac", "l2p", "dualprompt", "coda_prompt", "finetune"):
        config = module.get_config(f"method={method}")
        schema.check(config)
        assert config.augment.resized_crop == config.model.kwargs.resize == 224
        scale = (0.08, 1.0) if method == "coda_prompt" else (0.05, 1.0)
        assert config.augment.resized_crop_scale == scale and config.augment.flip
    if name != "vit_cifar100":  # 200 classes in 10 phases of 20, images stored at 224 px
        assert (config.protocol.init_classes, config.protocol.increment) == (0, 20)
        assert config.dataset.image_size == 256 and config.memory.per_class == 20
    if name == "vit_imagenet_r":  # PILOT's exps/l2p_inr.json
        l2p = module.get_config("method=l2p")
        assert (l2p.train.epochs, l2p.train.batch_size, l2p.train.lr) == (10, 32, 0.001875)
