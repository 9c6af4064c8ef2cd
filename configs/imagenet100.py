"""ImageNet-100 class-incremental with ResNet-18: the ResNet-18 counterpart of configs/cifar100.py.

    python scripts/prepare_tfds.py imagenet_resized/64x64     # once (needs the network and TensorFlow)
    incremental run --config=configs/imagenet100.py
    incremental run --config=configs/imagenet100.py:method=joint,protocol=b50_inc10

The 100 classes are the first 100 of the seed-1993 permutation of ImageNet's 1000 classes (the
"ImageNet-Subset" of UCIR and PODNet), chosen with `dataset.classes`. The data are the 64x64
downsampled images of `imagenet_resized`, kept in host memory as uint8 arrays (about 1.6 GB for 100
classes; reading first loads all 1000 classes, about 16 GB of host memory). Training batches stream
to the device through grain (`dataset.stream`, `incremental.data.stream`), in the order the
device-resident path would use; full-resolution images would also need a lazy host-side source
(`data.stream.open_tfds_split`), which `load_source` does not use yet.

Settings follow PyCIL's ImageNet-100 runs where they apply: batch 128, SGD lr 0.1 with momentum 0.9;
phase 0: 200 epochs, milestones 60/120/170, weight decay 5e-4; later phases: 80 epochs, milestones 40/70,
weight decay 2e-4; random crop and horizontal flip.
"""

from incremental.config import base_config, parse_arg, set_method, set_protocol


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "finetune", "protocol": "b0_inc10"})
    config = base_config()
    set_method(config, args["method"])
    config.dataset.name = "tfds:imagenet_resized/64x64"
    config.dataset.classes = "seeded:100"
    config.dataset.stream = True  # batches stream from host memory, not kept on the device
    set_protocol(config, args["protocol"])

    config.model.name = "resnet18"
    config.model.kwargs = {"small_input": True}

    config.train.batch_size = 128
    config.train.lr = 0.1
    config.train.epochs = 80
    config.train.milestones = (40, 70)
    config.train.weight_decay = 2e-4
    config.train_first.lr = 0.1
    config.train_first.epochs = 200
    config.train_first.milestones = (60, 120, 170)
    config.train_first.weight_decay = 5e-4

    config.augment.crop_padding = 8
    config.augment.flip = True
    config.eval.batch_size = 500
    return config
