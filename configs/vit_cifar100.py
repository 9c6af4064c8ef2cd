"""CIFAR-100 on a pre-trained ViT-B/16 at 224 px: the pre-trained-model methods' protocol (PILOT).

    python scripts/prepare_tfds.py cifar100       # once (needs the `prepare` extra and the network)
    incremental run --config=configs/vit_cifar100.py:method=simplecil,weights=ViT-B_16.npz
    incremental run --config=configs/vit_cifar100.py:method=l2p,weights=ViT-B_16.npz,protocol=b0_inc5

`arg` keys: `method` (simplecil, aper, ease, ranpac, l2p, dualprompt, coda_prompt; any other method
trains the ViT with its own loss), `weights` (the checkpoint: vision_transformer's ImageNet-21k
`ViT-B_16.npz`, which L2P and DualPrompt start from, a big_vision `.npz`, or a timm
`.safetensors` with `gelu=erf`), `protocol` (b0_inc10, the default, or b0_inc5), `gelu` (tanh for
the Google checkpoints, erf for timm's).

The 32-px images are resized to 224 inside the model (bilinear), 14 x 14 patches of 16; the inputs are
normalised with the checkpoint's constants (`vit_weights.Recipe`), not the data's. Class order from
seed 1993 (CODA-Prompt: the natural order, as PILOT's exps/coda_prompt.json does not shuffle). Training settings per method from PILOT's exps/*.json (sun-hailong/LAMDA-PILOT at
2647455), as each method's docstring cites them; no weight decay for the prompt methods (it shrinks
the prompts a phase does not select). Training images are augmented as PILOT's iCIFAR224 does
(utils/data.py lines 121-133): a random resized crop to 224 px of a fraction of the area in
(0.05, 1) and a width / height in (3/4, 4/3), then a horizontal flip (`build_transform`, lines
95-107); CODA-Prompt's own transform crops the area's default (0.08, 1) (lines 68-76). Test images
are resized to 256 (bicubic) and cropped to their central 224 inside the model (`center_crop`), as
PILOT's test transform does (lines 109-116).

Published B0-Inc10 last accuracy on ViT-B/16-IN21K (PILOT's README table): SimpleCIL 81.3,
L2P 84.6, DualPrompt 81.3, CODA-Prompt 86.3, RanPAC 92.2 (average incremental 87.6, 89.0, 86.6,
91.3, 94.0).
"""

from incremental.config import (
    PILOT_CIFAR_SETTINGS,
    base_config,
    parse_arg,
    set_method,
    set_pretrained_vit,
)

SETTINGS = PILOT_CIFAR_SETTINGS  # per method, from PILOT's exps/<method>.json


def get_config(arg: str | None = None):
    args = parse_arg(
        arg, {"method": "simplecil", "weights": "", "protocol": "b0_inc10", "gelu": "tanh"}
    )
    if args["protocol"] not in ("b0_inc10", "b0_inc5"):
        raise ValueError(f"protocol must be b0_inc10 or b0_inc5, got {args['protocol']!r}.")
    config = base_config()
    set_method(config, args["method"])
    config.dataset.name = "tfds:cifar100"
    config.protocol.init_classes = 0
    config.protocol.increment = 10 if args["protocol"] == "b0_inc10" else 5
    set_pretrained_vit(config, args, SETTINGS)
    return config
