"""Online class-incremental digits: 5 phases of 2 classes, each example seen once in batches of 10.

    incremental run --config=configs/online_digits.py:method=er_ace
    incremental run --config=configs/online_digits.py:method=der_pp,blurry=0.1
    incremental run --config=configs/online_digits.py:method=gdumb --config.memory.budget=100

One pass over each phase's stream (`protocol.online`, incremental/online.py), batch 10, plain SGD at
a constant lr 0.05, the MLP of configs/digits.py; a memory of 200 examples for the methods that keep
one (der_pp, er_ace, agem: reservoir; gdumb: its balanced sampler). results.json reports the online
accuracy (each batch's, before its update) beside the usual matrices. `arg` keys: `method`;
`blurry` (a fraction of each later phase's stream from earlier phases' classes, 0 by default).

Last accuracy, mean +- std over seeds 0-2 (tests/test_online.py asserts half of each margin over
finetune): finetune 0.21 +- 0.01 (only the last phase's classes survive), der_pp 0.86 +- 0.01,
er_ace 0.89 +- 0.02, agem 0.32 +- 0.06, gdumb 0.95 +- 0.00; each run takes seconds on 2 CPU cores.
"""

from incremental.config import base_config, parse_arg, set_method

# Per method, where the online setting needs other values than the method's defaults.
METHOD_ARGS = {
    # Mammoth's online Seq-MNIST setting (batch 10, one epoch, 200 stored): alpha 0.2, beta 1.0.
    "der_pp": {"alpha": 0.2, "beta": 1.0},
    "agem": {"minibatch_size": 128},  # Mammoth's online Seq-MNIST reference minibatch
    "gdumb": {"epochs": 64},  # 256 on CIFAR; the 200 stored digits need fewer
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "finetune", "blurry": "0"})
    config = base_config()
    set_method(config, args["method"])
    config.method_args.update(METHOD_ARGS.get(args["method"], {}))
    config.protocol.online = True
    config.protocol.blurry = float(args["blurry"])
    config.memory.budget = 200
    config.train.batch_size = 10
    config.train.epochs = config.train_first.epochs = 1
    config.train.milestones = config.train_first.milestones = ()
    config.train.schedule = "constant"
    config.train.momentum = 0.0
    config.train.lr = config.train_first.lr = 0.05
    config.train.weight_decay = config.train_first.weight_decay = 0.0
    return config
