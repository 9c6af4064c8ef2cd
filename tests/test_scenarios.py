"""The three scenarios of van de Ven, Tuytelaars & Tolias 2022 on digits: class-, task- and
domain-incremental (`protocol.scenario`), the methods that refuse one, and the metrics they report
(learning accuracy, forward transfer, top-5)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits, digits_task, permuted_digits
from incremental import evaluate, methods, report, schema, train, workdirs
from incremental import run as run_lib
from incremental.data import device, domains, sources
from incremental.methods import Batch, PhaseInfo, PhaseSetup
from incremental.phase import begin, load, record
from incremental.phase.context import make_context
from incremental.phase.model import init_variables, make_model, phase_model
from incremental.protocol import Protocol


def shrink(config, epochs=2, **protocol):
    config.log.progress = config.log.plot = config.log.tensorboard = False
    config.train.epochs = config.train_first.epochs = epochs
    config.train.milestones = config.train_first.milestones = ()
    config.protocol.update(protocol)
    return config


def phases(config, workdir):
    """Every phase of `config` through `run.train_phase`: each phase's `PhaseResult` (its arrays
    copied to the host: the next phase donates them), and the data, protocol and method."""
    data, protocol, method = load.validate(config, str(workdir))
    carried, state, out = None, method.init_state(), []
    for phase in range(protocol.num_phases):
        carried = run_lib.train_phase(config, method, data, protocol, phase, carried, state)
        state = carried.method_state
        out.append(jax.device_get(carried))
    return out, data, protocol, method


def test_task_scenario_keeps_old_head_blocks_bit_identical_under_new_head_only(tmp_path):
    config = shrink(digits_task.get_config("method=new_head_only"))
    config.head.capacity = 0  # the head grows a block per phase
    results, _, protocol, _ = phases(config, tmp_path)
    params = [r.variables["params"] for r in results]
    for j in range(protocol.num_phases):
        lo, hi = protocol.offsets[j], protocol.offsets[j + 1]
        for i in range(j + 1, protocol.num_phases):
            for leaf in ("kernel", "bias"):
                later, then = params[i]["head"][leaf], params[j]["head"][leaf]
                np.testing.assert_array_equal(later[..., lo:hi], then[..., lo:hi])
            backbones = [jax.tree.leaves(p["backbone"]) for p in (params[i], params[j])]
            for a, b in zip(*backbones, strict=True):
                np.testing.assert_array_equal(a, b)
            assert results[i].record["row"][j] == results[j].record["row"][j]
    assert params[-1]["head"]["kernel"].shape[1] == 10


def loss_grads(setup: PhaseSetup, labels):
    """The head kernel's gradient of finetune's loss on a digits batch of `labels`, phase 1 of
    2 + 2 classes."""
    config = digits_task.get_config()
    model = make_model(config, 4)
    x = jnp.asarray(sources.load_source("digits").x_train[: len(labels)], jnp.float32)
    variables = init_variables(model, np.zeros(x.shape[1:]), jax.random.PRNGKey(0))
    loss_fn = train.step.make_loss(model, methods.build("finetune"), PhaseInfo(1, 2, 2), setup)
    batch = Batch(x, jnp.asarray(labels), jnp.ones(len(labels)))

    def loss(params):
        return loss_fn(params, {}, {}, batch, None)[0]

    return np.asarray(jax.grad(loss)(variables["params"])["head"]["kernel"])


def test_the_task_loss_reaches_only_each_examples_own_head_block():
    labels = [2, 3, 2, 3]  # phase 1's classes
    task = loss_grads(PhaseSetup(task_offsets=(0, 2, 4)), labels)
    assert np.all(task[:, :2] == 0) and np.abs(task[:, 2:]).sum() > 0
    one_head = loss_grads(PhaseSetup(), labels)
    assert np.abs(one_head[:, :2]).sum() > 0  # without the task label the old block learns too
    mixed = loss_grads(PhaseSetup(task_offsets=(0, 2, 4)), [0, 1, 2, 3])  # replayed + new
    assert np.abs(mixed[:, :2]).sum() > 0 and np.abs(mixed[:, 2:]).sum() > 0


def test_the_task_setup_carries_the_offsets_unless_the_method_masks_its_own_loss():
    config, protocol = digits_task.get_config(), Protocol(tuple(range(6)), (2, 2, 2))
    info = PhaseInfo(1, 2, 2)
    for name in ("finetune", "replay", "ewc"):
        setup = begin.phase_setup(config, methods.build(name), protocol, info)
        assert setup.task_offsets == (0, 2, 4, 6)
    assert begin.phase_setup(config, methods.build("lwf"), protocol, info).task_offsets == ()
    one_head = begin.phase_setup(digits.get_config(), methods.build("finetune"), protocol, info)
    assert one_head.task_offsets == ()
    # Importances (EWC's Fisher, MAS) take the likelihood over the phase's own block too.
    ctx = methods.PhaseContext(info, np.zeros(0), np.zeros(0), None, config=config)
    assert methods.base.task_block_start(ctx) == 2
    assert methods.base.task_block_start(ctx._replace(config=digits.get_config())) == 0


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """Finetune on split digits with and without the task label (3 epochs a phase)."""
    out = {}
    for name, get_config in (("task", digits_task.get_config), ("class", digits.get_config)):
        workdir = tmp_path_factory.mktemp(name)
        out[name] = run_lib.run(shrink(get_config("method=finetune"), 3), str(workdir)), workdir
    return out


def test_task_accuracy_is_at_least_class_accuracy_and_far_above_it_for_finetune(finetune_runs):
    (task, _), (one_head, _) = finetune_runs["task"], finetune_runs["class"]
    assert task["scenario"] == "task" and one_head["scenario"] == "class"
    # The same model, scored with the task label and without: never lower with it.
    rows = zip(task["accuracy_matrix"], task["class_incremental_matrix"], strict=True)
    for with_label, without in rows:
        assert all(a >= b for a, b in zip(with_label, without, strict=True))
    assert all(
        a >= b for a, b in zip(task["accuracy"], task["class_incremental_accuracy"], strict=True)
    )
    assert task["accuracy"] == task["task_aware_accuracy"]
    # Measured (seeds 0-2): task 0.975-0.986, class-incremental finetune 0.19-0.20 (only the last
    # phase's classes survive).
    assert task["last_accuracy"] >= 0.9
    assert one_head["last_accuracy"] <= 0.35
    assert task["last_accuracy"] - one_head["last_accuracy"] >= 0.5
    assert task["forward_transfer"] is None and one_head["forward_transfer"] is None


def test_evaluating_a_saved_task_phase_scores_each_example_among_its_tasks_classes(finetune_runs):
    """In the task scenario `incremental evaluate`'s per-class accuracies and confusion are the
    task-aware ones, as its headline: each test example predicted among its own phase's classes,
    so the accuracies weighted by their counts make up the phase's (task-aware) accuracy."""
    results, workdir = finetune_runs["task"]
    doc = workdirs.evaluate(str(workdir))
    assert doc["accuracy"] == pytest.approx(results["accuracy"][-1])
    counts = np.array([entry["num_test"] for entry in doc["per_class"]])
    accuracies = np.array([entry["accuracy"] for entry in doc["per_class"]])
    assert np.sum(accuracies * counts) / counts.sum() == pytest.approx(doc["accuracy"])
    phase_of = {entry["class"]: entry["phase"] for entry in doc["per_class"]}
    for true, row in doc["confusion"].items():  # never a class of another task
        assert {phase_of[int(p)] for p in row} == {phase_of[int(true)]}, (true, row)
    # The run's own log of the last evaluation: the same task-aware confusion.
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if '"kind": "eval"' in line][-1]
    assert logged["per_class_accuracy"] == pytest.approx(accuracies.tolist())
    order = results["class_order"]
    for i, true in enumerate(order):
        for j, predicted in enumerate(order):
            expected = doc["confusion"].get(str(true), {}).get(str(predicted), 0)
            assert logged["confusion"][i][j] == expected, (true, predicted)


@pytest.fixture(scope="module")
def domain_workdirs(tmp_path_factory):
    """Permuted digits, 3 domains, 5 epochs a phase, seeds 0-2 in one vmapped program each."""
    out = {}
    for method in ("finetune", "replay", "joint"):
        config = shrink(permuted_digits.get_config(f"method={method}"), 5, num_domains=3)
        config.head.capacity = 0  # the head would widen here if a phase brought classes
        config.seeds = (0, 1, 2)
        out[method] = tmp_path_factory.mktemp(method)
        run_lib.run(config, str(out[method]))
    return out


@pytest.fixture(scope="module")
def domain_runs(domain_workdirs):
    """Each method's results.json of seeds 0-2."""
    return {
        method: [json.loads((w / f"seed_{s}" / "results.json").read_text()) for s in (0, 1, 2)]
        for method, w in domain_workdirs.items()
    }


def test_domain_scenario_head_never_grows(domain_runs):
    for runs in domain_runs.values():
        for result in runs:
            assert result["phase_sizes"] == [10, 0, 0] and result["scenario"] == "domain"
            heads = {p["num_params"]["head"] for p in result["phases"]}
            assert heads == {256 * 10 + 10}
            assert [p["num_seen"] for p in result["phases"]] == [10, 10, 10]


def test_domain_scenario_orders_joint_replay_finetune(domain_runs):
    """Measured (last accuracy, seeds 0-2): joint 0.969-0.973, replay 0.923-0.930, finetune
    0.738-0.744; asserted per seed with half the smallest gaps as margins."""
    for seed in range(3):
        last = {m: runs[seed]["last_accuracy"] for m, runs in domain_runs.items()}
        assert last["joint"] >= last["replay"] + 0.02, last
        assert last["replay"] >= last["finetune"] + 0.09, last


def test_evaluating_a_saved_domain_phase_counts_the_domains_learned_so_far(domain_workdirs):
    """`incremental evaluate` of phases 0 and 1 of 3: the per-class counts and the confusion hold
    the test examples of the domains learned so far (not of those still to come), and their
    accuracies make up the phase's accuracy as the run recorded it."""
    workdir = domain_workdirs["replay"] / "seed_0"
    results = json.loads((workdir / "results.json").read_text())
    per_domain = sources.load_source("digits").y_test.shape[0]
    for phase in (0, 1):
        doc = workdirs.evaluate(str(workdir), phase)
        counts = np.array([entry["num_test"] for entry in doc["per_class"]])
        assert counts.sum() == doc["num_test"] == (phase + 1) * per_domain
        confused = sum(n for row in doc["confusion"].values() for n in row.values())
        assert confused == counts.sum()
        accuracies = np.array([entry["accuracy"] for entry in doc["per_class"]])
        assert np.sum(accuracies * counts) / counts.sum() == pytest.approx(doc["accuracy"])
        assert doc["accuracy"] == pytest.approx(results["accuracy"][phase])


def test_removing_a_class_from_a_domain_run_keeps_every_domain(domain_workdirs, tmp_path):
    """Every phase of the domain scenario brings every class: `remove_classes` edits each phase in
    its place (it used to fold them into one, as phases left without classes), and each edited
    phase is scored on its learned domains without the class."""
    workdir = domain_workdirs["replay"] / "seed_0"
    record = workdirs.remove_classes(str(workdir), [3], str(tmp_path / "out"))
    assert record["phases"] == {"0": 0, "1": 1, "2": 2}
    edited = json.loads((tmp_path / "out" / "results.json").read_text())
    assert edited["scenario"] == "domain" and edited["phase_sizes"] == [9, 0, 0]
    per_domain = int(np.sum(sources.load_source("digits").y_test != 3))  # ids are the labels
    for phase in range(3):
        doc = workdirs.evaluate(str(tmp_path / "out"), phase)
        assert doc["num_test"] == (phase + 1) * per_domain
        assert doc["accuracy"] == pytest.approx(edited["accuracy"][phase])


def test_the_plot_draws_a_line_for_every_domain(domain_runs, tmp_path):
    results = domain_runs["finetune"][0]
    matrix = results["accuracy_matrix"]
    seen, lines = report.phase_lines(results)
    assert list(seen) == [0, 1, 2]
    assert [label for label, _, _ in lines] == ["domain 0", "domain 1", "domain 2"]
    for j, (_, x, values) in enumerate(lines):
        assert list(x) == list(range(j, 3)) and values == [row[j] for row in matrix[j:]]
    # In the class scenario a phase of known classes (`incremental learn`) has no line of its own.
    learned = {**results, "scenario": "class", "phase_sizes": [4, 6, 0]}
    assert [label for label, _, _ in report.phase_lines(learned)[1]] == [
        "phase 0 classes",
        "phase 1 classes",
    ]
    report.plot(results, str(tmp_path / "accuracy.png"))
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def hand_accuracy(config, method, data, protocol, phase, variables, domain):
    """The accuracy of `variables` (the model of `phase`) on `domain`'s test data, by hand."""
    info = begin.phase_info(protocol, phase)
    model = phase_model(config, method, info, final=True)
    mine = data.test_arrival == domain
    x = device.normalize(jnp.asarray(data.x_test[mine]), data.norm)
    _, logits = model.apply(variables, x, train=False)
    return float(np.mean(np.asarray(logits).argmax(axis=1) == data.y_test[mine]))


def test_forward_transfer_and_learning_accuracy_match_a_hand_computation(tmp_path):
    config = shrink(permuted_digits.get_config("method=finetune"), 2, num_domains=3)
    results, data, protocol, method = phases(config, tmp_path)
    records = [r.record for r in results]
    doc = record.results_from_records(config, protocol, records)
    matrix = doc["accuracy_matrix"]
    assert doc["learning_accuracy"] == [matrix[j][j] for j in range(3)]
    assert doc["average_learning_accuracy"] == pytest.approx(
        np.mean([matrix[j][j] for j in range(3)])
    )
    # The random-init model, rebuilt from phase 0's key, scored on each domain by hand.
    ctx = make_context(config, data, begin.phase_info(protocol, 0), method)
    init = begin.start_variables(config, method, data, ctx, None)
    by_hand = [hand_accuracy(config, method, data, protocol, 0, init, d) for d in range(3)]
    assert doc["random_init_accuracy"] == pytest.approx(by_hand, abs=1e-9)
    before = [None] + [
        hand_accuracy(config, method, data, protocol, i - 1, results[i - 1].variables, i)
        for i in (1, 2)
    ]
    assert doc["accuracy_before_learning"] == pytest.approx(before, abs=1e-9)
    transfer = np.mean([before[i] - by_hand[i] for i in (1, 2)])
    assert doc["forward_transfer"] == pytest.approx(transfer, abs=1e-9)


def test_transfer_from_a_matrix():
    matrix = [[0.9], [0.6, 0.8], [0.3, None, 0.7]]
    out = evaluate.transfer(matrix, before=[None, 0.2, 0.5], init=[0.1, 0.1, 0.3])
    assert out["learning_accuracy"] == [0.9, 0.8, 0.7]
    assert out["average_learning_accuracy"] == pytest.approx(0.8)
    assert out["forward_transfer"] == pytest.approx(((0.2 - 0.1) + (0.5 - 0.3)) / 2)
    assert evaluate.transfer(matrix)["forward_transfer"] is None


def test_top5_and_the_task_headline_from_scores():
    protocol = Protocol(tuple(range(20)), (10, 10))
    y = np.array([0, 1, 12, 15])
    scores = np.zeros((4, 20))
    scores[0, 0] = 9  # right
    scores[1, [2, 3, 4, 5, 6]], scores[1, 1] = 9, 8  # 6th highest: out of the top 5
    scores[2, [11, 13, 14, 16]], scores[2, 12] = 9, 8  # 5th highest: in the top 5
    scores[3, 3], scores[3, 15] = 9, 8  # wrong in one head, right within phase 1's classes
    row = evaluate.evaluate_phase(scores, y, protocol, 1)
    assert row["top5_accuracy"] == 0.5 + 0.25 and row["accuracy"] == 0.25
    task = evaluate.evaluate_phase(scores, y, protocol, 1, task_labels=True)
    assert task["row"] == [0.5, 0.5] and task["accuracy"] == 0.5
    assert (
        task["class_incremental_row"] == [0.5, 0.0] and task["class_incremental_accuracy"] == 0.25
    )
    assert "top5_accuracy" not in evaluate.evaluate_phase(
        scores[:2, :10], y[:2], Protocol(tuple(range(10)), (10,)), 0
    )


def test_permuted_and_rotated_domains():
    source = sources.load_source("digits")
    made = domains.make_domains(source, "permute", 3, seed=0)
    n = len(source.y_train)
    assert made.source.x_train.shape == (3 * n, 8, 8, 1)
    np.testing.assert_array_equal(made.source.x_train[:n], source.x_train)  # phase 0: as it is
    np.testing.assert_array_equal(made.source.y_train, np.tile(source.y_train, 3))
    np.testing.assert_array_equal(made.train_domain, np.repeat([0, 1, 2], n))
    moved = made.source.x_train[n : 2 * n].reshape(n, -1)
    assert not np.array_equal(moved, source.x_train.reshape(n, -1))
    np.testing.assert_array_equal(np.sort(moved, 1), np.sort(source.x_train.reshape(n, -1), 1))
    again = domains.make_domains(source, "permute", 3, seed=0).source.x_train
    np.testing.assert_array_equal(again, made.source.x_train)  # offline and seeded
    other = domains.make_domains(source, "permute", 3, seed=1).source.x_train
    assert not np.array_equal(other[n:], made.source.x_train[n:])
    turned = domains.make_domains(source, "rotate", 2, seed=0).source.x_test
    m = len(source.y_test)
    np.testing.assert_array_equal(turned[m:], np.rot90(source.x_test, 1, axes=(1, 2)))  # 90°
    with pytest.raises(ValueError, match="use protocol.domains='permute'"):
        domains.make_domains(sources.load_source("mnist1d"), "rotate", 2, seed=0)


def test_split_domains_relabel_each_pair_as_the_same_two_classes():
    source = sources.load_source("digits")
    order = (3, 7, 0, 9, 1, 2, 4, 5, 6, 8)
    made = domains.make_domains(source, "split", 5, seed=0, order=order)
    assert made.source.num_classes == 2
    np.testing.assert_array_equal(made.source.x_train, source.x_train)  # the examples as they are
    for domain, pair in enumerate(zip(order[::2], order[1::2], strict=True)):
        for label, class_id in enumerate(pair):
            mine = source.y_train == class_id
            assert np.all(made.train_domain[mine] == domain)
            assert np.all(made.source.y_train[mine] == label)
    with pytest.raises(ValueError, match="pick a number that divides 10"):
        domains.make_domains(source, "split", 3, seed=0)
    config = shrink(permuted_digits.get_config("domains=split"))
    data, protocol, _ = load.load_data(config)
    assert protocol.phase_sizes == (2, 0, 0, 0, 0) and set(data.test_arrival) == set(range(5))


def test_replay_keeps_an_even_share_of_every_domain(tmp_path):
    config = shrink(permuted_digits.get_config("method=replay"), 1, num_domains=3)
    config.memory.selection = "random"
    results, data, _, _ = phases(config, tmp_path)
    memory = results[-1].method_state["memory"]
    idx, labels = np.asarray(memory["indices"]), np.asarray(memory["labels"])
    np.testing.assert_array_equal(data.y_train[idx], labels)
    counts = np.zeros((3, 10), int)
    np.add.at(counts, (data.arrival[idx], labels), 1)
    share = config.memory.budget // 10 // 3  # 20 per class, split over 3 domains
    assert np.all(counts == share), counts


REFUSED = {
    "task": ("icarl", "bic", "wa", "lucir", "foster"),
    "domain": ("bic", "wa", "lucir", "der", "memo", "foster", "ncm", "new_head_only", "icarl"),
}
RUN = {
    "task": ("finetune", "joint", "freeze_backbone", "new_head_only", "ncm", "analytic", "lwf",
             "ewc", "online_ewc", "si", "mas", "replay", "der", "memo"),
    "domain": ("finetune", "joint", "freeze_backbone", "analytic", "lwf", "ewc", "online_ewc",
               "si", "mas", "replay"),
}  # fmt: skip
CONFIGS = {"task": digits_task.get_config, "domain": permuted_digits.get_config}


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_methods_run_a_scenario_or_refuse_it_with_a_reason(scenario, tmp_path):
    for name in RUN[scenario] + REFUSED[scenario]:
        config = CONFIGS[scenario](f"method={name}")
        method = methods.build(name, config.method_args, config.memory)
        problem = method.scenario_problem(scenario)
        assert (problem is None) == (name in RUN[scenario]), (name, problem)
        assert method.scenario_problem("class") is None
    for name in REFUSED[scenario][:2]:  # refused by the validation, before anything is loaded
        config = CONFIGS[scenario](f"method={name}")
        with pytest.raises(ValueError, match=f"'{name}' cannot run protocol.scenario='{scenario}'"):
            load.validate(config, str(tmp_path / "never"))
        assert not (tmp_path / "never").exists()
    lwf = digits_task.get_config("method=lwf")
    lwf.method_args.ce_classes = "seen"
    with pytest.raises(ValueError, match="ce_classes=new"):
        load.check_scenario(lwf, methods.build("lwf", lwf.method_args))


def test_the_scenario_configs_build():
    for config in (
        digits_task.get_config("method=replay"),
        permuted_digits.get_config("method=ewc"),
        permuted_digits.get_config("method=lwf,domains=rotate"),
    ):
        schema.check(config)
        load.check_scenario(config, methods.build(config.method, config.method_args))
    assert permuted_digits.get_config("domains=rotate").protocol.domains == "rotate"
    with pytest.raises(ValueError, match="Invalid config"):
        bad = digits.get_config()
        bad.protocol.scenario = "online"
        schema.check(bad)
