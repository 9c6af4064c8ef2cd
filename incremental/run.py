"""`run(config, workdir)`: the phase pipeline (`incremental.phase`) for one run, with checkpoints,
resume and preemption; `config.seeds` hands over to `incremental.seeds`."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, NamedTuple

from incremental import capacity, checkpoint, compilation, lock, online, parallel, report, seeds
from incremental.metrics import MetricsLog
from incremental.phase import begin, end, evaluate, fit, load, record, save
from incremental.phase.begin import Carried
from incremental.preemption import Preempted, Preemption

PyTree = Any


class PhaseResult(NamedTuple):
    """A phase's outcome, for notebooks and tests that run phases one at a time (`train_phase`)."""

    variables: PyTree
    opt_state: Any
    method_state: dict
    record: dict


def run(
    config, workdir: str, *, stop_after: int | None = None, allow_data_change: bool = False
) -> dict:
    """Runs (or resumes) the phases of `config` in `workdir` and returns the results document.

    Args:
      config: the run's ConfigDict (see `incremental.config.base_config`).
      workdir: where results.json, the plot and the checkpoints go; a directory that already holds
        checkpoints of the same config is resumed where it stopped (after the last finished phase,
        or within a phase after the last saved step).
      stop_after: stop after this phase (a staged run; calling again resumes).
      allow_data_change: resume although the data's fingerprint differs from the saved run's.

    Raises:
      Preempted: after SIGTERM/SIGINT, once the current steps are saved.
    """
    if config.seeds:
        return seeds.run_seeds(config, workdir, allow_data_change=allow_data_change)
    parallel.initialize(config)
    data, protocol, method = load.validate(config, workdir)
    load.make_workdir(workdir)
    compilation.use_cache(config.compile_cache)
    mesh = parallel.make_mesh(config.parallel.devices)
    main = parallel.is_main_process()  # the others train alongside and write no files
    # One writer per work directory (the main process of a multi-host run writes its files).
    with lock.hold(workdir) if main else contextlib.nullcontext():
        ckpts = checkpoint.Checkpoints(workdir, config.checkpoint.keep)
        log = MetricsLog(
            workdir,
            tensorboard=config.log.tensorboard,
            wandb=config.log.wandb,
            config=config.to_dict(),
            enabled=main,
        )
        try:
            # What is saved and compared; a resumed run keeps the width it was saved with.
            saved = ckpts.saved_head_capacity()
            config = capacity.resolved(config, method, protocol.num_classes, saved)
            first, carried, method_state, records = save.resume(
                ckpts, config, method, protocol, data, allow_data_change=allow_data_change
            )
            progress = report.Progress(protocol, enabled=config.log.progress and main, start=first)
            results = record.results_from_records(config, protocol, records) if records else None
            if results is not None and main:
                record.repair_results(workdir, results)
            last = (
                protocol.num_phases - 1
                if stop_after is None
                else min(stop_after, protocol.num_phases - 1)
            )
            programs = capacity.Programs()  # head.capacity: the programs every phase shares
            with Preemption(report.console) as preempt, progress:
                for phase in range(first, last + 1):
                    within = Within(
                        config, ckpts, preempt, progress, protocol, records, data.fingerprint, log
                    )
                    carried, rng, rec, confusion = run_phase(
                        config, method, data, protocol, phase, carried, method_state, programs,
                        within, startup=process_seconds() if phase == first else None,
                    )  # fmt: skip
                    method_state = carried.method_state
                    records.append(rec)
                    results = record.results_from_records(config, protocol, records)
                    if main:
                        record.write_results(workdir, results)
                    save.save(
                        ckpts, config, protocol, phase, carried, rng, records, mesh,
                        data.fingerprint,
                    )  # fmt: skip
                    log.evaluation(rec, confusion)
                    progress.phase_done(records[-1])
                    if preempt.requested and phase < last:
                        raise Preempted(f"Stopped after phase {phase}, saved.")
        finally:
            log.close()
            ckpts.close()
    if config.log.plot and results is not None and main:
        report.plot(results, os.path.join(workdir, "accuracy.png"))
    return results


def process_seconds() -> float:
    """Seconds since this process started (imports, validation, data, resume: its start-up, when
    read before its first phase); on systems without /proc, since `incremental.run` was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def run_phase(
    config, method, data, protocol, phase: int, carried, method_state: dict, programs, within,
    *, startup: float | None = None,
):  # fmt: skip
    """One phase of a run: begin, fit (checkpointed by `within`), end and evaluate, timed.

    Returns the carried state, the phase's training key (saved with it), the phase's record, which
    holds `startup_seconds` (the process's seconds before it) for its first phase, and the
    confusion matrix of its evaluation (for the metrics log, not results.json).
    """
    start = time.perf_counter()
    with compilation.CompileTimer() as compiled:
        pr, state, method_state = begin.begin(
            config, method, data, protocol, phase, carried, method_state, programs
        )
        evaluations = step_evaluations(config, method, data, protocol, pr, programs)
        state, method_state, steps = within.fit(pr, state, method_state, evaluations)
        model, carried = end.end(config, method, data, pr, state, method_state)
        seconds = {"train_seconds": time.perf_counter() - start}
        start = time.perf_counter()
        row = evaluate.evaluate_phase(
            config, model, method, data, protocol, phase, carried.variables,
            carried.method_state, programs, confusion=True,
        )  # fmt: skip
        confusion = row.pop("confusion")
        seconds["eval_seconds"] = time.perf_counter() - start
    seconds["compile_seconds"] = compiled.seconds  # inside train + eval seconds
    seconds["compile_cache_hits"] = compiled.cache_hits
    if startup is not None:
        seconds["startup_seconds"] = startup
    rec = record.record(
        protocol, pr, carried.variables, row, steps.last_epoch, seconds, data.fingerprint
    )
    if steps.evaluations:
        rec["step_evaluations"] = steps.evaluations
    return carried, state.rng, rec, confusion


def step_evaluations(config, method, data, protocol, pr, programs=None):
    """The fit stage's evaluations within the phase (`protocol.eval_every_steps`), or None."""
    every = online.eval_every(config)
    if not every:
        return None

    def score(variables, method_state):
        return evaluate.evaluate_phase(
            config, pr.model, method, data, protocol, pr.info.phase, variables, method_state,
            programs, extras=False,
        )  # fmt: skip

    return online.StepEvaluations(every, score)


class Within:
    """The fit stage of a checkpointed run: resumes after a within-phase checkpoint, saves every
    `checkpoint.every_steps` / `every_epochs`, and stops (saved) when preemption is requested."""

    def __init__(
        self, config, ckpts, preempt, progress, protocol, records: list, fingerprint="", log=None
    ):
        self.config, self.ckpts, self.preempt = config, ckpts, preempt
        self.progress, self.protocol, self.records = progress, protocol, records
        self.fingerprint, self.log = fingerprint, log or MetricsLog("", enabled=False)
        self._clock = time.perf_counter()

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size

    def fit(self, pr: begin.PhaseRun, state, method_state, evaluations=None):
        """The phase's steps; `evaluations` (an `on_call`, `online.StepEvaluations`) runs after
        each call, before its checkpoint."""
        phase, saved = pr.info.phase, None
        restored = save.restore_within(self.ckpts, phase, state) if pr.epochs else None
        if restored is not None:
            state, method_state, saved = restored
            epoch = saved["step"] // pr.steps_per_epoch
            report.console.print(f"Resuming phase {phase} at step {saved['step']} (epoch {epoch}).")
        steps = fit.Steps.of(pr, saved)
        self.log.resume(phase, steps.step)
        self.progress.start_steps(phase, pr.epochs, pr.steps_per_epoch, done=steps.step)
        self._clock = time.perf_counter()
        on_call = self.after_call
        if evaluations is not None:

            def on_call(*args):
                evaluations(*args)
                self.after_call(*args)

        return fit.fit(pr, state, method_state, steps=steps, on_call=on_call)

    def after_call(self, steps: fit.Steps, state, method_state, ended_epoch: bool) -> None:
        now, examples = time.perf_counter(), (steps.step - steps.call_start) * self.batch_size
        rate = examples / max(now - self._clock, 1e-9)
        self.log.train(steps.phase, steps.call_start, steps.call, rate)
        self.progress.steps_done(steps.step, steps.call, rate)
        self._clock = now
        if ended_epoch:
            self.log.epoch(steps.phase, steps.epoch, steps.step, steps.last_epoch)
        if steps.step == steps.total:
            return  # the phase-end checkpoint follows
        every_epochs = self.config.checkpoint.every_epochs
        epoch_end = steps.step % steps.per_epoch == 0
        if (
            self.preempt.requested
            or online.checkpoint_due(self.config, steps.step)
            or (epoch_end and every_epochs and steps.epoch % every_epochs == 0)
        ):
            meta = save.meta(
                self.config,
                self.protocol,
                steps.phase,
                self.records,
                steps.state_dict(),
                self.fingerprint,
            )
            self.ckpts.save_within(steps.phase, steps.step, state, method_state, meta)
        if self.preempt.requested:
            self.ckpts.wait()
            raise Preempted(f"Stopped in phase {steps.phase} at step {steps.step}, saved.")


def train_phase(
    config, method, data, protocol, phase: int, carried: PhaseResult | Carried | None,
    method_state: dict, progress: report.Progress | None = None,
) -> PhaseResult:  # fmt: skip
    """One whole phase without checkpoints (for notebooks and tests): begin, fit, end, evaluate,
    record."""
    del progress
    start = time.perf_counter()
    if isinstance(carried, PhaseResult):
        carried = Carried(carried.variables, carried.opt_state, carried.method_state)
    pr, state, method_state = begin.begin(
        config, method, data, protocol, phase, carried, method_state
    )
    evaluations = step_evaluations(config, method, data, protocol, pr)
    state, method_state, steps = fit.fit(pr, state, method_state, on_call=evaluations)
    model, carried = end.end(config, method, data, pr, state, method_state)
    seconds = {"train_seconds": time.perf_counter() - start}
    row = evaluate.evaluate_phase(
        config, model, method, data, protocol, phase, carried.variables, carried.method_state
    )
    rec = record.record(
        protocol, pr, carried.variables, row, steps.last_epoch, seconds, data.fingerprint
    )
    if steps.evaluations:
        rec["step_evaluations"] = steps.evaluations
    return PhaseResult(carried.variables, carried.opt_state, carried.method_state, rec)
