"""CUB-200-2011 on a pre-trained ViT-B/16 at 224 px, B0-Inc20: PILOT's CUB benchmark.

    python scripts/prepare_tfds.py caltech_birds2011    # once (needs `prepare` and the network)
    incremental run --config=configs/vit_cub200.py:method=simplecil,weights=ViT-B_16.npz
    incremental run --config=configs/vit_cub200.py:method=ranpac,weights=ViT-B_16.npz

`arg` keys as configs/vit_cifar100.py's: `method` (simplecil, ranpac, l2p, dualprompt,
coda_prompt; any other method trains the ViT with its own loss), `weights` (vision_transformer's
ImageNet-21k `ViT-B_16.npz`, a big_vision `.npz`, or a timm `.safetensors` with `gelu=erf`), `gelu`.

TFDS's `caltech_birds2011`: 200 bird species, its own train (5,994) and test (5,794) splits. The
images, of varying sizes, are stored at 256 x 256 (shorter side resized bicubically, central square
kept: `dataset.image_size`); test images are their central 224 x 224 (the model's `center_crop`:
PILOT's Resize(256) + CenterCrop(224), utils/data.py lines 109-116). 10 phases of 20 classes, class order from seed 1993 (CODA-Prompt:
natural, as PILOT runs it). Training images get PILOT's `build_transform` (sun-hailong/LAMDA-PILOT
at 2647455, utils/data.py lines 95-107, used by its CUB class at lines 260-278): a random resized
crop to 224 of (0.05, 1) of the area, ratio (3/4, 4/3), and a horizontal flip; CODA-Prompt's
transform crops the default (0.08, 1) (lines 68-76). PILOT ships no CUB settings (exps/ has
CIFAR-100 and ImageNet-R files only), so each method trains with its CIFAR-100 settings
(exps/<method>.json), as configs/vit_cifar100.py does; exemplar methods keep 20 per class, PILOT's
ImageNet-R rule.

Published numbers: PILOT's README plots CIFAR-100 and ImageNet-R only, and no CUB B0-Inc20 figure
was verified for this file; the APER (arXiv 2303.07338) and RanPAC (arXiv 2307.02251) papers report
CUB-200 with ViT-B/16, whose phases and splits should be checked against these before comparing.
"""

from incremental.config import (
    PILOT_CIFAR_SETTINGS,
    base_config,
    parse_arg,
    set_method,
    set_pretrained_vit,
    set_protocol,
)

SETTINGS = PILOT_CIFAR_SETTINGS  # PILOT has no CUB settings: its CIFAR-100 ones


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "simplecil", "weights": "", "gelu": "tanh"})
    config = base_config()
    set_method(config, args["method"])
    config.dataset.name = "tfds:caltech_birds2011"
    config.dataset.image_size = 256  # the test transform's Resize(256); crops of it train
    set_protocol(config, "b0_inc20")
    config.memory.per_class = 20
    set_pretrained_vit(config, args, SETTINGS)
    return config
