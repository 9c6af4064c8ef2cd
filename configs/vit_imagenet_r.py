"""ImageNet-R on a pre-trained ViT-B/16 at 224 px, B0-Inc20: DualPrompt's and PILOT's protocol.

    python scripts/prepare_tfds.py imagenet_r     # once (needs the `prepare` extra and the network)
    incremental run --config=configs/vit_imagenet_r.py:method=simplecil,weights=ViT-B_16.npz
    incremental run --config=configs/vit_imagenet_r.py:method=l2p,weights=ViT-B_16.npz

`arg` keys as configs/vit_cifar100.py's: `method` (simplecil, ranpac, l2p, dualprompt,
coda_prompt; any other method trains the ViT with its own loss), `weights` (vision_transformer's
ImageNet-21k `ViT-B_16.npz`, a big_vision `.npz`, or a timm `.safetensors` with `gelu=erf`), `gelu`.

ImageNet-R (Hendrycks et al. 2021) holds 30,000 renditions of 200 ImageNet classes in one split:
`load_source` holds out 20% of each class to test (`dataset.holdout`, seed 0) and trains on the
rest, as PILOT's train/ and test/ folders do; the class ids become 0..199 in ImageNet's order. The
images, of varying sizes, are stored at 256 x 256 (shorter side resized bicubically, central square
kept: `dataset.image_size`), about 5.9 GB of uint8 on the device; test images are their central
224 x 224 (the model's `center_crop`: PILOT's Resize(256) + CenterCrop(224), lines 109-116). 10 phases of 20 classes, class
order from seed 1993 (CODA-Prompt: natural, as PILOT runs it). Training images get PILOT's
`build_transform` (sun-hailong/LAMDA-PILOT at 2647455, utils/data.py lines 95-107, used by
iImageNetR at lines 208-235): a random resized crop to 224 of (0.05, 1) of the area, ratio (3/4,
4/3), and a horizontal flip; CODA-Prompt's transform crops the default (0.08, 1) (lines 68-76).
Training settings per method from PILOT's exps/<method>_inr.json; exemplar methods keep 20 per class
(PILOT's README: `memory_per_class` 20 for ImageNet-R).

Published B0-Inc20 last accuracy on ViT-B/16-IN21K, read off PILOT's plot
(resources/imagenetRb0inc20.jpg at 2647455; to about half a point): SimpleCIL 61.3, DualPrompt
69.2, CODA-Prompt 73.5.
"""

from incremental.config import (
    base_config,
    parse_arg,
    set_method,
    set_pretrained_vit,
    set_protocol,
)

# Per method: (optimizer, lr, batch, epochs, schedule, weight decay) from PILOT's exps/*_inr.json.
SETTINGS = {
    "simplecil": ("sgd", 0.01, 256, 0, "constant", 0.05),  # prototypes of frozen features only
    "ranpac": ("sgd", 0.05, 16, 10, "cosine", 0.005),  # phase-0 adaptation, then the ridge head
    "l2p": ("adam", 0.001875, 32, 10, "constant", 0.0),
    "dualprompt": ("adam", 0.001, 24, 10, "constant", 0.0),
    "coda_prompt": ("adam", 0.001, 128, 50, "cosine", 0.0),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "simplecil", "weights": "", "gelu": "tanh"})
    config = base_config()
    set_method(config, args["method"])
    config.dataset.name = "tfds:imagenet_r"
    config.dataset.image_size = 256  # the test transform's Resize(256); crops of it train
    config.dataset.holdout = 0.2
    set_protocol(config, "b0_inc20")
    config.memory.per_class = 20
    set_pretrained_vit(config, args, SETTINGS)
    return config
