"""The default: scikit-learn's bundled 8x8 digits, 5 phases of 2 classes, an MLP. No download needed.

    incremental run                                      # finetune, the default method
    incremental run --config=configs/digits.py:method=joint
    incremental run --config=configs/digits.py:method=new_head_only --config.train.epochs=10
    incremental run --config=configs/digits.py:model=vit     # a tiny ViT (the digits resized)

On 2 CPU cores a run takes well under a minute. Expected last accuracy (see experiments/seed_answers.md):
joint about 0.96, freeze_backbone about 0.8, finetune about 0.2 (only the last phase's classes survive).
"""

from incremental.config import base_config, parse_arg, set_method


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "finetune", "model": "mlp"})
    config = base_config()
    set_method(config, args["method"])
    if args["model"] == "vit":
        # A tiny ViT: the 8x8 digits resized to 16x16 inside the model, 16 patches of 4x4 and [CLS].
        config.model.name = "vit"
        kwargs = {"patch": 4, "resize": 16, "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128}
        config.model.kwargs = kwargs
    elif args["model"] != "mlp":
        raise ValueError(f"configs/digits.py: model must be mlp or vit, got {args['model']!r}.")
    if args["method"] == "mas":
        # MAS's importances grow with the logits here; at the published strength 1 SGD with lr 0.05
        # diverges in phase 3 (lr * strength * importance must stay below about 3.8).
        config.method_args.strength = 0.01
    if args["method"] == "memo":
        # MEMO shares all layers but the last and copies the last per phase: it needs two.
        config.model.kwargs.hidden = (256, 256)
    if args["method"] == "foster":
        config.method_args.compression_epochs = config.train.epochs  # 130 is CIFAR's
    return config
