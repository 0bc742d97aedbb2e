"""Policy objectives as units, one module per family, each with its advantages and its loss:

- ``grpo``: group-relative advantages and the token-level clipped loss (GRPO, DAPO, Dr. GRPO).
- ``gspo``: the sequence-level, length-normalised ratio.
- ``cispo``: the clipped stop-grad importance weight times the log-prob.
- ``ppo``: GAE advantages and the critic (``PpoCritic``: value model, optimizer, value loss).

``common`` holds what every family uses (the step's batch, loss aggregation, the KL term,
off-policy weights, mismatch metrics), ``shaping`` the reward shaping, batch filters and the
clip-high controller, ``loss`` the ``PolicyLoss`` that composes a family's surrogate with the
shared terms, and ``step`` the ``ObjectiveStep`` the trainer drives. ``learner.algo.name``
picks the family (climbrl/config.py).

Tested against TRL's GRPOTrainer (tests/unit/test_objectives_trl.py,
tests/unit/test_parity_trl_float64.py) and hand-computed cases (tests/unit/test_objectives.py).
"""
