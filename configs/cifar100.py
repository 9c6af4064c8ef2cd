"""CIFAR-100 class-incremental, with the field's settings (PyCIL / iCaRL): ResNet-32, batch 128, SGD.

    python scripts/prepare_tfds.py cifar100          # once (needs the `prepare` extra and the network)
    incremental run --config=configs/cifar100.py                       # finetune, B0-Inc10
    incremental run --config=configs/cifar100.py:method=joint,protocol=b50_inc10

`arg` keys: `protocol` in b0_inc10 (10 phases of 10), b0_inc20, b50_inc10, b50_inc5; `method`.

Settings (PyCIL's `models/finetune.py`): phase 0 trains 200 epochs, lr 0.1, milestones 60/120/170,
weight decay 5e-4; later phases 80 epochs, lr 0.1, milestones 40/70, weight decay 2e-4; lr decay 0.1,
momentum 0.9; class order from seed 1993; random crop (padding 4) and horizontal flip. PyCIL also applies
ColorJitter(brightness=63/255), which is not implemented here. Normalisation uses the training set's
channel statistics (the CIFAR-100 values PyCIL hard-codes).

Targets for a full GPU run, B0-Inc10 last accuracy read off PyCIL's figures (about +-1 point):
finetune 9.2, joint 70.2.
"""

from incremental.config import base_config, parse_arg, set_method

PROTOCOLS = {"b0_inc10": (0, 10), "b0_inc20": (0, 20), "b50_inc10": (50, 10), "b50_inc5": (50, 5)}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "finetune", "protocol": "b0_inc10"})
    if args["protocol"] not in PROTOCOLS:
        raise ValueError(
            f"Unknown protocol {args['protocol']!r}; choose one of {sorted(PROTOCOLS)}."
        )
    config = base_config()
    set_method(config, args["method"])
    config.dataset.name = "tfds:cifar100"
    config.protocol.init_classes, config.protocol.increment = PROTOCOLS[args["protocol"]]

    config.model.name = "resnet32"
    config.model.kwargs = {}

    config.train.batch_size = 128
    config.train.optimizer = "sgd"
    config.train.momentum = 0.9
    config.train.lr_decay = 0.1
    config.train.lr = 0.1
    config.train.epochs = 80
    config.train.milestones = (40, 70)
    config.train.weight_decay = 2e-4
    config.train_first.lr = 0.1
    config.train_first.epochs = 200
    config.train_first.milestones = (60, 120, 170)
    config.train_first.weight_decay = 5e-4

    config.augment.crop_padding = 4
    config.augment.flip = True
    config.eval.batch_size = 1000
    return config
