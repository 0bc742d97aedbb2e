"""climbrl: asynchronous RL, pretraining and serving for language models.

Decoupled processes (vLLM rollout servers, a learner, sandboxed environments) exchange weights
and trajectories over ZeroMQ. See README.md for the two commands that run the demo and the tests.
"""

__version__ = "0.1.0"
