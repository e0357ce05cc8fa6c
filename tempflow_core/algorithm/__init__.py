"""The paper's method, on a policy, without orchestration or a store layout.

    schedule.py       timesteps, sigmas, the SDE noise level s_t and the noise-aware weights
    sde.py            the ODE step, the SDE step (eq. 5) with its log-prob, the closed-form KL (eq. 6)
    steps.py          which steps branch and train, and each step's weight
    iteration.py      IterationPlan: one iteration's steps, weights, importance and counts, decided once
    rollout.py        branched (ODE -> one SDE step -> ODE) and plain SDE rollouts; ODE sampling
    advantages.py     group-wise or global-std advantages
    objective.py      the clipped ratio x step weight + beta KL
    learner.py        one update: inner epochs x minibatches x micro-batches
    data_parallel.py  a rank's share of an update and its gradient all-reduce
    checkpoint.py     the training state on the store (LoRA, AdamW, RNG, prompt position): exact resume
    session.py        the Session of a run (model, schedule, optimizer, reward, prompt stream, EMA)
    evaluation.py     the held-out evaluation (fixed seeds, ODE + CFG, scores with standard errors)
    controller.py     a training run top to bottom: plan, roll out, score, update, evaluate, on a context
                      (in memory, a run's store, Prefect tasks) that owns reuse, healing and placement
    train.py          the rollout, reward and update steps the stages share; InMemory; `train_in_process`

Imports: the base modules (config, seeding, prompts, ...), the data plane (storage, shards),
rewards, shapes and policies; never run, engines or reports.
"""
