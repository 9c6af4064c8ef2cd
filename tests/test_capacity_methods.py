"""head.capacity with every method that opts in: the widening path's numbers over 3 phases, and
a fixed number of programs however many phases (a file of its own: the longest of the suite, run
beside the others by the test workers)."""

import numpy as np
import pytest
from capacity_helpers import NUM_CLASSES, run_both_heads

# Methods with a teacher or an importance compile twice: phase 0 has no teacher to evaluate (one
# program for it would cost phase 0 a teacher's forward pass in every step), the later phases
# share one. ncm and analytic train in phase 0 only. (method, overrides, train programs)
DYNAMIC = [
    ("lwf", {}, 2),
    ("lwf", {"method_args.ce_classes": "seen"}, 2),
    ("icarl", {}, 2),
    ("icarl", {"method_args.loss_type": "ce_kd"}, 2),
    ("wa", {}, 2),
    ("bic", {"method_args.bias_epochs": 3}, 2),
    ("bic", {"method_args.bias_stage": "pycil", "method_args.bias_epochs": 1}, 2),
    ("ewc", {}, 2),
    ("online_ewc", {"method_args.strength": 10.0}, 2),
    ("mas", {}, 2),
    ("si", {}, 1),  # its state has the same shape in every phase: one program
    ("ncm", {}, 1),
    ("analytic", {"method_args.expansion": 64}, 1),
    # Cosine head, margin ranking over the new columns, the old columns frozen by a traced count.
    ("lucir", {}, 2),
    ("lucir", {"method_args.top_k": 5, "method_args.adaptive": False}, 2),  # top_k > num_new
    # Its finetuning trains through `ctx.fit`: one more program per later phase on either path.
    ("lucir", {"method_args.class_balanced_finetune": True, "method_args.cbf_epochs": 2}, 2, 2),
    ("new_head_only", {}, 2),  # phase 0's program and the frozen one's
]


# The everyday suite runs one case of each kind of state (a teacher, exemplars with NME, a closed-form
# head, and a cosine head with frozen columns whose finetuning is a fit with the method's loss
# through `ctx.fit`, as BiC's stage 2 is); the full suite (`-m ""`, CI) runs every case: each is two
# full runs of three phases, an end-to-end check.
EVERYDAY = {0, 2, 12, 15}


def cases():
    return [
        pytest.param(*(*case, 0)[:4], marks=() if i in EVERYDAY else (pytest.mark.slow,))
        for i, case in enumerate(DYNAMIC)
    ]


@pytest.mark.parametrize("method, overrides, programs, fits", cases())
def test_every_dynamic_method_gives_the_widening_numbers(
    tmp_path, monkeypatch, method, overrides, programs, fits
):
    """Each method's hooks under traced counts: the widening path's accuracies (NME and the
    methods' extra classifiers too) over 3 phases, and a fixed number of train and eval programs
    however many phases (the widening path compiles them once per phase), besides `fits`
    trainings through `ctx.fit` with the method's loss, compiled for each."""
    results, counts = run_both_heads(tmp_path, monkeypatch, method, overrides)  # 4 + 3 + 3
    wide, widened = results[NUM_CLASSES], results[0]
    matrices = sorted(k for k in widened if k.endswith("_matrix"))
    assert matrices == sorted(k for k in wide if k.endswith("_matrix"))
    for key in matrices:
        assert wide[key] == widened[key], key
    trained = [p for p in widened["phases"] if p["final_loss"] is not None]
    assert trained, "no phase trained"
    np.testing.assert_allclose(
        [p["final_loss"] for p in wide["phases"] if p["final_loss"] is not None],
        [p["final_loss"] for p in trained],
        rtol=1e-6,
    )
    assert wide["accuracy_matrix"][0][0] > 0.5  # a real run: phase 0 learned its classes
    assert counts[0]["predict"] == 3 and counts[NUM_CLASSES]["predict"] == 1
    assert counts[NUM_CLASSES].get("loss", 0) == programs + fits  # one trace per program
    assert counts[0].get("loss", 0) == len(trained) + fits
