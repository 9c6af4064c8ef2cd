"""Online class-incremental CIFAR-100, the setting of Mammoth's and the online papers' benchmarks:
10 phases of 10 classes, one pass over each phase's stream in batches of 10, a memory of 500 or
2000 examples.

    python scripts/prepare_tfds.py cifar100          # once (needs the `prepare` extra and the network)
    incremental run --config=configs/online_cifar100.py:method=er_ace
    incremental run --config=configs/online_cifar100.py:method=der_pp,memory=500

`arg` keys: `method` (er_ace by default; der_pp, agem, gdumb, and the offline methods that can learn
online: incremental/online.py); `memory` 2000 (default) or 500; `blurry` (a fraction of each later
phase's stream from earlier phases' classes, 0 by default).

Settings: ResNet-18 with the 3x3 stem for 32x32 images (Mammoth's CIFAR-100 backbone; the online
papers' reduced ResNet-18 with 20 base filters is not among incremental/models), plain SGD at a
constant lr 0.1 without weight decay (ER-ACE's online runs, Caccia et al. 2022), batch 10 and a
memory minibatch of 10, random crop (padding 4) and horizontal flip of the incoming and the memory
batches (Mammoth's Seq-CIFAR-100 transform); class order from seed 1993, as configs/cifar100.py.
DER++ uses Mammoth's Seq-CIFAR-100 values for 500 stored (`models/config/derpp.yaml` at e75a491:
alpha 0.3, beta 0.5); GDumb trains 256 epochs on its memory at each phase end (its default).
No targets are recorded yet: this has not been run on a GPU here.
"""

from incremental.config import base_config, parse_arg, set_method, set_protocol

MEMORIES = ("500", "2000")
METHOD_ARGS = {"der_pp": {"alpha": 0.3, "beta": 0.5}}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "er_ace", "memory": "2000", "blurry": "0"})
    if args["memory"] not in MEMORIES:
        raise ValueError(f"memory={args['memory']!r}: one of {MEMORIES}.")
    config = base_config()
    set_method(config, args["method"])
    config.method_args.update(METHOD_ARGS.get(args["method"], {}))
    config.dataset.name = "tfds:cifar100"
    set_protocol(config, "b0_inc10")
    config.protocol.online = True
    config.protocol.blurry = float(args["blurry"])
    config.memory.budget = int(args["memory"])

    config.model.name = "resnet18"
    config.model.kwargs = {"small_input": True}

    config.train.batch_size = 10
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.train.schedule = "constant"
    config.train.optimizer = "sgd"
    config.train.momentum = 0.0
    config.train.lr = config.train_first.lr = 0.1
    config.train.weight_decay = config.train_first.weight_decay = 0.0

    config.augment.crop_padding = 4
    config.augment.flip = True
    config.eval.batch_size = 1000
    return config
