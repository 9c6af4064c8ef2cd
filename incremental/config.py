"""Config helpers shared by the files in `configs/`: the base config and the `arg` string parser.

A config file defines `get_config(arg=None) -> ConfigDict`; `arg` is the text after the colon in
`--config=configs/NAME.py:ARG`, as comma-separated `key=value` pairs (`method=joint,protocol=b50_inc10`).
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
    """Parses `'k=v,k=v'` over `defaults`; unknown keys raise a ValueError listing the valid ones."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"Config arg {item!r} is not 'key=value' with key in {sorted(defaults)}."
            )
        values[key] = value
    return values


# The field's protocols: (classes in phase 0, classes per later phase); 0 means B0 (equal phases).
PROTOCOLS = {"b0_inc10": (0, 10), "b0_inc20": (0, 20), "b50_inc10": (50, 10), "b50_inc5": (50, 5)}


def set_protocol(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets `config.protocol.{init_classes, increment}` from a name in PROTOCOLS."""
    if name not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}.")
    config.protocol.init_classes, config.protocol.increment = PROTOCOLS[name]


# The pre-trained-model methods' training on CIFAR-100, per method: (optimizer, lr, batch, epochs,
# schedule, weight decay) from PILOT's exps/<method>.json (sun-hailong/LAMDA-PILOT at 2647455); no
# weight decay for the prompt methods (it shrinks the prompts a phase does not select).
PILOT_CIFAR_SETTINGS = {
    "simplecil": ("sgd", 0.01, 256, 0, "constant", 5e-4),  # prototypes of frozen features only
    "ranpac": ("sgd", 0.01, 48, 20, "cosine", 5e-4),  # phase-0 adaptation, then the ridge head
    "l2p": ("adam", 0.001875, 16, 5, "constant", 0.0),
    "dualprompt": ("adam", 0.001, 24, 5, "constant", 0.0),
    "coda_prompt": ("adam", 0.001, 128, 20, "cosine", 0.0),
    "aper": ("sgd", 0.01, 48, 20, "cosine", 5e-4),  # exps/aper_aperpter.json lines 15-21
    "ease": ("sgd", 0.025, 48, 20, "cosine", 5e-4),  # exps/ease.json lines 15-23: every phase
}


def set_pretrained_vit(
    config: ml_collections.ConfigDict, args: dict, settings: dict[str, tuple]
) -> None:
    """The pre-trained-model protocol of PILOT (sun-hailong/LAMDA-PILOT at 2647455) on a ViT-B/16:
    the checkpoint `args["weights"]` (its GELU `args["gelu"]`), bf16 compute, 224-px random resized
    crops and flips (utils/data.py `build_transform`, lines 95-107; CODA-Prompt's own, lines 68-76,
    crops the default area (0.08, 1) and keeps the classes in their natural order, `"shuffle":
    false`), and the method's (optimizer, lr, batch, epochs, schedule, weight decay) in `settings`
    (L2P's for a method without an entry)."""
    method = args["method"]
    config.model.name = "vit"
    # Test images as PILOT's test transform makes them: Resize(256, bicubic), CenterCrop(224)
    # (utils/data.py lines 109-116); training crops arrive at 224 and pass unchanged.
    config.model.kwargs = {
        "size": "b", "patch": 16, "resize": 224, "center_crop": 224 / 256,
        "interpolation": "cubic", "gelu": args["gelu"],
    }  # fmt: skip
    config.dtype = "bfloat16"  # compute; params and optimizer state stay float32
    config.model.pretrained = args["weights"]
    config.augment.resized_crop, config.augment.flip = 224, True  # the model's resize too
    coda = method == "coda_prompt"
    config.augment.resized_crop_scale = (0.08, 1.0) if coda else (0.05, 1.0)
    if coda:
        config.protocol.class_order = "natural"
    optimizer, lr, batch, epochs, schedule, decay = settings.get(method, settings["l2p"])
    config.train.optimizer, config.train.schedule = optimizer, schedule
    config.train.batch_size = batch
    config.eval.batch_size = 256
    for section in (config.train, config.train_first):
        section.lr, section.epochs, section.milestones, section.weight_decay = lr, epochs, (), decay


def set_method(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets `config.method` and fills `config.method_args` with that method's defaults.

    The filled keys can then be overridden (`--config.method_args.strength=10`); choose the method with
    the config file's `method=` arg, so that its keys exist when the overrides are applied.
    """
    from incremental import method_defaults  # plain values: a config file loads without JAX

    if name in method_defaults.ARGS:
        args = method_defaults.ARGS[name]
        selection = method_defaults.MEMORY_SELECTION.get(name)
    else:  # a method registered from outside the package, or a name the registry refuses
        from incremental import methods

        args, memory = methods.default_args(name), methods.default_memory(name)
        selection = None if memory is None else memory.selection
    config.method = name
    config.method_args = ml_collections.ConfigDict(args)
    if selection in ("reservoir", "balanced"):
        config.memory.selection = selection  # the method's own rule for its stream memory


def base_config() -> ml_collections.ConfigDict:
    """Every key the phase loop reads, with the digits defaults; config files change what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Several seeds in one program (incremental.seeds): every seed's train steps run together under
    # jax.vmap, and results.json reports each seed and the mean and std. Empty: just `seed`.
    c.seeds = ()
    c.method = "finetune"
    c.method_args = ml_collections.ConfigDict()  # the method's hyper-parameters (dataclass fields)
    c.dtype = "float32"  # computation dtype; parameters and optimizer state stay float32
    # JAX's persistent compilation cache, so a second or resumed run does not compile again:
    # "auto" is $INCREMENTAL_COMPILE_CACHE, else $INCREMENTAL_CACHE/jax (~/.cache/incremental/jax).
    c.compile_cache = "auto"
    c.parallel = ml_collections.ConfigDict()
    c.parallel.devices = 0  # data-parallel over this many devices (0: all)
    # FSDP-style: split parameters (and optimizer moments) of at least `shard_min_size` elements
    # over the devices instead of replicating them, for backbones too large to copy on each device.
    c.parallel.shard_params = False
    c.parallel.shard_min_size = 1 << 16
    c.parallel.coordinator = ""  # "host:port" of process 0 starts jax.distributed (several hosts)
    c.parallel.num_processes = 1
    c.parallel.process_id = 0

    _add_data(c)

    _add_protocol(c)

    c.memory = ml_collections.ConfigDict()  # exemplar memory of rehearsal methods
    c.memory.budget = 200  # total exemplars split evenly over seen classes (CIFAR-100: 2000)
    c.memory.per_class = 0  # > 0: this many per class instead (FACIL's 20)
    # herding | random | closest_to_mean (at phase ends); reservoir | balanced (as the stream
    # arrives: der_pp, er_ace, agem | gdumb, which set it)
    c.memory.selection = "herding"

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # mlp | convnet | resnet32 | resnet18 | vit
    c.model.kwargs = ml_collections.ConfigDict({"hidden": (256,)})  # passed to the backbone
    # Phase 0 starts from a classifier you have (incremental/phase/pretrained.py: .msgpack or an
    # orbax directory); with train_first.epochs=0 it is phase 0's model as it is.
    c.model.init_from = ""
    c.model.pretrained = ""  # a ViT checkpoint (.npz, timm .safetensors) as the backbone at init

    c.head = ml_collections.ConfigDict()
    c.head.init = "default"  # new columns: default (the layer's initialiser) | zeros | imprint
    # C >= the number of classes: a head of C columns from the start, unseen classes masked, so the
    # train and eval steps compile once for the whole run (incremental/capacity.py). 0: widen the
    # head each phase (its steps compile again for each width). -1 (auto): the protocol's number of
    # classes for every method that supports it (all but der, memo and foster), else 0. The
    # numbers are the same either way.
    c.head.capacity = -1

    _add_training(c)

    c.checkpoint = ml_collections.ConfigDict()  # does not change results; may differ on resume
    c.checkpoint.every_epochs = 0  # also save within a phase every this many epochs (0: phase ends)
    # Also save within a phase every this many steps (0: off). It is also how often SIGTERM/SIGINT
    # is noticed: a call of the jitted step runs this many steps, or to the epoch's end when 0.
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 2  # within-phase checkpoints kept (phase ends are all kept)

    c.log = ml_collections.ConfigDict()  # does not change results; may differ on resume
    c.log.progress = True  # progress bars
    c.log.plot = True  # accuracy plot (PNG) in the work directory
    c.log.tensorboard = (
        True  # TensorBoard event files in WORKDIR/tensorboard (metrics.jsonl: always)
    )
    c.log.wandb = ""  # a Weights & Biases project to log to (needs the optional wandb package)
    return c


def _add_protocol(c: ml_collections.ConfigDict) -> None:
    """The protocol section: class order, phases, scenario and online stream."""
    c.protocol = ml_collections.ConfigDict()
    c.protocol.class_order = "seeded"  # seeded | natural | explicit "3,1,0,..."
    c.protocol.class_order_seed = 1993  # iCaRL / PyCIL / FACIL
    c.protocol.init_classes = 2  # classes in phase 0 (0: same as increment, the B0 protocols)
    c.protocol.increment = 2  # new classes in each later phase
    c.protocol.phase_sizes = ""  # explicit phase sizes "5,1,1,1,1,1"; overrides the two above
    # What a phase brings (van de Ven et al. 2022): class (new classes, no task label at test),
    # task (new classes, the task label given: one head block per phase) or domain (every class in
    # every phase, the inputs transformed per phase; incremental/data/domains.py).
    c.protocol.scenario = "class"
    c.protocol.domains = "permute"  # domain: permute | rotate | split (incremental/data/domains.py)
    c.protocol.num_domains = 5  # domain: the number of phases (phase 0 is the data as it is)
    c.protocol.domain_seed = 0  # domain: the seed of the permutations (not the run's seed)
    # Online (incremental/online.py): one pass over each phase's stream in batches of
    # train.batch_size (10 in the online configs), each example seen once; the online accuracy
    # (each batch's, before its update) is reported. Needs train.epochs = train_first.epochs = 1.
    c.protocol.online = False
    c.protocol.eval_every_steps = 0  # also evaluate every this many steps of a phase (0: off)
    c.protocol.blurry = 0.0  # this fraction of each later phase's stream from earlier classes


def _add_data(c: ml_collections.ConfigDict) -> None:
    """The `dataset` section of `base_config`: where the examples come from."""
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "digits"  # digits | mnist1d | tfds:NAME | npz:PATH | folder:PATH (image dirs)
    c.dataset.data_dir = ""  # tfds data directory ("" = tfds default, ~/tensorflow_datasets)
    c.dataset.classes = ""  # keep some classes: "" all | "seeded:K" | explicit "3,5,7"
    c.dataset.download = False  # let tfds download and prepare (needs the network and TensorFlow)
    # npz: renumber the class ids present (sorted) as 0..K-1; else ids must already be 0..K-1.
    c.dataset.remap_labels = False
    # folder: resize images to this square side; tfds: resize the shorter side to it and keep the
    # central square (datasets of varying sizes need it). 0: native, all one size.
    c.dataset.image_size = 0
    # folder without train/, test/ and tfds imagenet_r, imagenet_a (a test split only): each
    # class's fraction held out to test (seed 0); the rest is trained on.
    c.dataset.holdout = 0.2
    c.dataset.skip_bad_files = False  # folder: skip (and warn about) undecodable image files
    # > 0: that fraction of each class's training data is held out and evaluated instead of the
    # test set (hyper-parameter selection, `incremental sweep --select`); results say "validation".
    c.dataset.validation = 0.0
    # Keep the training data on the host and stream each batch to the device (data.stream), for
    # datasets that do not fit in device memory; the batches are those of the in-memory path.
    c.dataset.stream = False
    # Sources brought to a finished run by `incremental learn`, in order: each is one more phase,
    # its classes matched to the run's by name (new names are new classes), trained on its examples.
    c.dataset.learned = ()


def _add_training(c: ml_collections.ConfigDict) -> None:
    """The optimisation keys of `base_config`: `train` (phases 1, 2, ...), `train_first` (phase 0),
    `augment` and `eval`."""
    c.train = ml_collections.ConfigDict()  # phases 1, 2, ...
    c.train.batch_size = 64
    c.train.optimizer = "sgd"  # sgd | adam | adamw
    c.train.momentum = 0.9
    c.train.nesterov = False
    c.train.schedule = "multistep"  # multistep | cosine | constant
    # scan: each epoch is one lax.scan; steps: a Python loop over one jitted step (the same steps);
    # auto: steps for convolutional models on CPU (XLA:CPU's slow convolution gradients in loops).
    c.train.loop = "auto"
    c.train.lr = 0.05
    c.train.epochs = 30
    c.train.milestones = (20,)  # epochs at which multistep multiplies the lr by lr_decay
    c.train.lr_decay = 0.1
    c.train.weight_decay = 5e-4
    c.train.carry_opt_state = (
        False  # keep optimizer moments across phases (widened for new columns)
    )
    c.train.freeze = ()  # ((regex, frozen), ...) over parameter paths, e.g. (("backbone/.*", True),)

    c.train_first = ml_collections.ConfigDict()  # phase 0 (PyCIL's init_* settings)
    c.train_first.lr = 0.05
    c.train_first.epochs = 30
    c.train_first.milestones = (20,)
    c.train_first.weight_decay = 5e-4

    c.augment = ml_collections.ConfigDict()  # images only, applied on the device
    c.augment.crop_padding = 0  # random crop after zero padding by this many pixels (0: off)
    c.augment.flip = False  # random horizontal flip
    c.augment.brightness = 0.0  # ColorJitter(brightness=...): factor in [1 - b, 1 + b] (0: off)
    c.augment.cutout = 0  # Cutout: a zeroed square of this side at a random centre (0: off)
    c.augment.autoaugment = ""  # AutoAugment policy before Cutout: 'cifar10' ('': off)
    # torchvision's RandomResizedCrop to this side, first (0: off): a box of a fraction of the area
    # in resized_crop_scale and a width / height in resized_crop_ratio (log-uniform), resized
    # bilinearly. Evaluation sees the stored images: a ViT resizes them (model.kwargs.resize).
    c.augment.resized_crop = 0
    c.augment.resized_crop_scale = (0.08, 1.0)
    c.augment.resized_crop_ratio = (3 / 4, 4 / 3)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 500


def with_defaults(saved: dict) -> dict:
    """A saved config (as a dict) with the keys added to `base_config` since it was saved, at their
    defaults: what the run did before they existed. The free-form sections (`method_args`,
    `model.kwargs`) stay as saved."""
    from incremental.schema import FREE_FORM

    def merge(base: dict, values: dict, prefix: str) -> dict:
        out = dict(base)
        for key, value in values.items():
            name = f"{prefix}{key}"
            nested = isinstance(value, dict) and isinstance(base.get(key), dict)
            out[key] = (
                merge(base[key], value, f"{name}.") if nested and name not in FREE_FORM else value
            )
        return out

    return merge(base_config().to_dict(), saved, "")
