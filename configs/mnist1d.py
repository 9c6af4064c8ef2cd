"""MNIST-1D (Greydanus 2020), generated locally by the `mnist1d` package: 40-d signals, 10 classes,
5 phases of 2 classes, an MLP.

    incremental run --config=configs/mnist1d.py
    incremental run --config=configs/mnist1d.py:method=joint
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
    if args["method"] in ("ewc", "online_ewc"):
        # At FACIL's 5000 the penalty diverges in phase 4 here; PyCIL's 1000 is stable.
        config.method_args.strength = 1000.0
    config.dataset.name = "mnist1d"
    config.model.kwargs.hidden = (256, 256)
    config.train.batch_size = 128
    for phase_cfg in (config.train, config.train_first):
        phase_cfg.lr = 0.05
        phase_cfg.epochs = 40
        phase_cfg.milestones = (30,)
    return config
