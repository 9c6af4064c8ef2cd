"""Task-incremental digits: scikit-learn's 8x8 digits in 5 phases of 2 classes (split digits, like
van de Ven et al.'s split MNIST), the task label given in training and at test. No download needed.

    incremental run --config=configs/digits_task.py                 # finetune
    incremental run --config=configs/digits_task.py:method=lwf
    incremental run --config=configs/digits_task.py:method=new_head_only

Each phase's 2 classes are one block of the head; training masks each example's logits to its
phase's block, and prediction to the test example's (`protocol.scenario='task'`). results.json's
headline numbers are then task-incremental; the same model's one-head numbers are under
`class_incremental_*`. icarl, bic, wa, lucir and foster are refused: their losses and corrections
set new classes against old ones in one head, which the task label makes moot.

Measured (seeds 0-2, 30 epochs a phase; experiments/scenarios.md): last accuracy 0.986 finetune,
0.986 ewc, 0.998 lwf, 0.997 replay, 0.998 joint: every method does well, as van de Ven et al. 2022
find on split MNIST (the same model without the task label: 0.2-0.7).
"""

from incremental.config import base_config, parse_arg, set_method


def get_config(arg: str | None = None):
    args = parse_arg(arg, {"method": "finetune"})
    config = base_config()
    set_method(config, args["method"])
    config.protocol.scenario = "task"
    if args["method"] == "mas":
        # As in configs/digits.py: at the published strength 1, SGD with lr 0.05 diverges here.
        config.method_args.strength = 0.01
    return config
