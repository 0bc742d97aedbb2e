"""How new weights travel from the learner to the engines.

- ``climbrl.weights.transport``: the ``WeightSender`` / ``WeightReceiver`` interface and its
  transports (ZeroMQ frames, the shared-memory ring on one host, in-process for tests, and
  CUDA IPC / NCCL on GPUs, ``climbrl.gpu_weights``);
- ``climbrl.weights.codecs``: the encodings (full, delta, LoRA factors) and the engine-side
  weight state (``EngineWeights``);
- ``climbrl.weights.files``: the files weights travel in on one host (the learner's
  ``ShmRing``, a server's ``FrameLanding`` and staging file) and their private folders;
- ``climbrl.learner.weights.WeightPublisher``: the learner's side, which encodes each publish;
- ``climbrl.rollout.weight_receiver.WeightUpdateReceiver``: a server's side, in phases;
- ``climbrl.rollout.worker_ext``: the thin vLLM worker extension that reloads the engine, and
  ``climbrl.weights.vllm_cpu.CpuFastPath``, the CPU fast path inside vLLM 0.32's internals.
"""
