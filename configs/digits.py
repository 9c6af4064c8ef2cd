"""The default: scikit-learn's bundled 8x8 digits, 5 phases of 2 classes, an MLP. No download needed.

    incremental run                                      # finetune, the default method
    incremental run --config=configs/digits.py:method=joint
    incremental run --config=configs/digits.py:method=new_head_only --config.train.epochs=10

On 2 CPU cores a run takes well under a minute. Expected last accuracy (see experiments/seed_answers.md):
joint about 0.96, freeze_backbone about 0.8, finetune about 0.2 (only the last phase's classes survive).
"""

from incremental.config import base_config, parse_arg, set_method


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "finetune"})
    config = base_config()
    set_method(config, args["method"])
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
