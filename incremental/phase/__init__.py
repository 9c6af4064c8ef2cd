"""The phase pipeline: each stage a function in the module named for it.

    load.load / load.validate     config -> data (labels remapped), protocol, method
    for each phase:
      begin.begin                 grow, widen, the method's begin_phase, optimizer, jitted epoch
      fit.fit                     the epochs (within-phase checkpoints, preemption)
      end.end                     the method's compress and end_phase: the phase's final model
      evaluate.evaluate           accuracy on every seen class: the phase's rows of the matrices
      record.record               the phase's entry of results.json
      save.save                   the phase's checkpoint (save.resume reads it back)

`run.run` composes these for one run, `seeds.run_seeds` for several seeds in one program; both
read as the list above. `model` (the phase's model) and `context` (what the method's host-side
hooks see, with the `fit` service for hooks that train on their own) serve every stage.
"""
