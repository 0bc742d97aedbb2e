"""Every message climbrl processes exchange, as msgspec Structs, and how they go on a socket.

A message is a multipart ZeroMQ message: ``[kind, body, *tensor_frames]``. ``kind`` is a small
ASCII frame naming the type (so a socket picks its typed decoder before touching the body),
``body`` is msgpack, and tensors follow as raw frames described by ``TensorMeta`` entries in the
body: (name, dtype, shape) plus the bytes, sent without copies. Nothing is pickled.

Each socket side accepts a fixed set of kinds (``LEARNER_ACCEPTS``, ``ROLLOUT_ACCEPTS``); anything
else, or a body that does not decode, raises ``WireError`` which the receive loops log (at most
once per ``LogLimiter`` period and cause) and skip.

A session on the wire: the rollout server connects with the run's credentials
(``climbrl.wirekeys``) and repeats its ``Hello`` every heartbeat until the learner answers
``Control("welcome")``, which carries the learner's ``run_id``; from then on both sides drop any
message whose ``run_id`` is not the run's. The learner refuses (``Error`` code
``hello_refused``) a ``Hello`` for a server id that is still alive.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import msgspec

SCHEMA_VERSION = 1


class WireError(ValueError):
    """A frame that is malformed, foreign, of another schema version or not allowed here."""


class _Msg(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    schema: int = SCHEMA_VERSION
    run_id: str = ""
    sent_at: float = msgspec.field(default_factory=time.time)


# ---------------------------------------------------------------- rollout server -> learner


class Hello(_Msg, kw_only=True):
    """A rollout server announces itself once its engine is up."""

    server_id: str
    pid: int
    hostname: str
    policy_version: int
    model: str
    max_concurrency: int
    http_url: str = ""  # the OpenAI API on this engine ("" = not served)


class Heartbeat(_Msg, kw_only=True):
    server_id: str
    policy_version: int
    inflight: int
    accepting_orders: bool = True  # False while the served weights are pinned
    # The longest the server's event loop was blocked since the previous heartbeat (seconds):
    # env code doing synchronous work there stalls generation and weight updates alike.
    loop_lag_max_s: float = 0.0
    # What the loop was running during that lag, innermost first ("" when not caught):
    # "func (file:line) <- caller (file:line)" (climbrl.rollout.loop_lag).
    loop_lag_where: str = ""
    # Engine health: "" while the server's vLLM engine runs, else why it died (the server
    # stops then, and the learner moves its orders at once)
    engine_error: str = ""
    # vLLM's sleep mode: the engine freed its GPU memory (Control "sleep:<level>"), and takes
    # it back on "wake" (colocated placement: the learner steps meanwhile)
    asleep: bool = False


class Routing(msgspec.Struct, array_like=True):
    """Routed MoE experts of one sample (R3 replay): ``data`` is a C-order array of ``dtype``
    ("uint8" or "int16") and ``shape`` [T, layers, top_k], T = input positions from the first
    prompt token on. 255 (uint8) / -1 (int16) marks a position or layer that was not recorded."""

    dtype: str
    shape: list[int]
    data: bytes


ENV_ERROR = "env_error"  # Sample.finish_reason of an episode whose environment failed


class Sample(msgspec.Struct, kw_only=True):
    """One episode. ``completion_ids`` holds every token after the prompt, the model's and the
    environment's (multi-turn); ``completion_mask`` is 1 where the model generated the token.
    ``logprobs`` and ``versions`` align with ``completion_ids`` (0 / -1 where mask is 0)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    reward: float
    finish_reason: str
    text: str = ""
    metrics: dict[str, float] = {}
    task_id: str = ""  # the env's Task.task_id
    step_rewards: list[float] = []  # optional per-step rewards (StepResult.step_reward)
    # Train = inference replay (climbrl.rollout.replay). keep_counts aligns with completion_ids:
    # the top-p/top-k kept set of that token is the n highest tempered logits, ties included
    # (0 = unfiltered or not recorded). routing: the experts the engine routed each position to.
    keep_counts: list[int] = []
    routing: Routing | None = None
    # finish_reason ENV_ERROR: the environment raised or timed out (the cause); the learner
    # leaves the episode out of its group. A group whose episodes all failed is an Error.
    error: str = ""


class Trajectory(_Msg, kw_only=True):
    """The finished group of samples for one work order."""

    order_id: str
    server_id: str
    policy_version: int  # oldest weight version that produced any token in the group
    samples: list[Sample]
    gen_seconds: float
    num_generated_tokens: int


class WeightAck(_Msg, kw_only=True):
    server_id: str
    version: int
    ok: bool
    phases: dict[str, float] = {}  # seconds per phase: recv, stage, pause, reload, resume
    error: str = ""
    deferred: bool = False  # pinned: kept, applied when the pin is lifted
    rolled_back: bool = False  # failed midway; the previous weights were reloaded
    shm_unreadable: bool = False  # the learner's /dev/shm file could not be read: send frames
    # WeightManifest.digest: sha256 of each engine parameter's bytes after the update, in the
    # engine's own layout (equal to a fresh engine's exactly when it holds the same weights)
    param_digests: dict[str, str] = {}


class Error(_Msg, kw_only=True):
    """A peer reports a failure tied to a message (``ref_id``) or to itself."""

    origin: str
    code: str
    message: str
    ref_id: str = ""


# ---------------------------------------------------------------- learner -> rollout server


class SamplingSpec(msgspec.Struct, kw_only=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None


class WorkOrder(_Msg, kw_only=True):
    """Run ``group_size`` episodes of one task of one environment and send back a Trajectory."""

    order_id: str
    policy_version: int  # learner's version when it dispatched the order
    env: str
    env_args: dict[str, Any] = {}
    task_index: int
    split: str = "train"
    group_size: int
    sampling: SamplingSpec


class TensorMeta(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    shape: list[int]


class WeightManifest(_Msg, kw_only=True):
    """New weights: one frame per entry of ``tensors`` follows the body. ``kind``, the frame
    name suffixes and the LoRA fields are read by ``climbrl.weights.codecs``."""

    version: int
    tensors: list[TensorMeta]
    kind: str = "full"  # "full": every tensor; "delta": what changed since base_version
    base_version: int = -1  # delta: the version the engine must be at
    adapters: bool = False  # True: the "#lora_A"/"#lora_B" frames replace the adapter set
    lora_scale: float = 0.0  # alpha / r: merged weight = W + (B @ A) * lora_scale
    # Same-host transport: no frames follow; the tensors are in this file (under /dev/shm) at
    # these byte offsets (climbrl.weights.files.write_shm / map_shm).
    shm_path: str = ""
    shm_offsets: list[int] = []
    digest: bool = False  # ack with WeightAck.param_digests (tests compare against a fresh load)


class Control(_Msg, kw_only=True):
    # "shutdown", "ping", "welcome" (the learner accepted this server's Hello), "sleep:<level>"
    # and "wake" (vLLM's sleep mode around the learner's step, colocated on one GPU)
    command: str


LEARNER_ACCEPTS: dict[bytes, type[_Msg]] = {
    b"hello": Hello,
    b"heartbeat": Heartbeat,
    b"traj": Trajectory,
    b"weights_ack": WeightAck,
    b"error": Error,
}
ROLLOUT_ACCEPTS: dict[bytes, type[_Msg]] = {
    b"work": WorkOrder,
    b"weights": WeightManifest,
    b"control": Control,
    b"error": Error,
}
KIND_OF: dict[type, bytes] = {t: k for k, t in (LEARNER_ACCEPTS | ROLLOUT_ACCEPTS).items()}

_encoder = msgspec.msgpack.Encoder()

HELLO_REFUSED = "hello_refused"  # Error.code: a Hello the learner did not accept (see message)


def term_context(ctx: Any, timeout_s: float) -> bool:
    """``ctx.term()`` (a ZeroMQ context), bounded: it blocks while any socket of the context
    is open, e.g. one owned by a thread that did not stop. False if it had not returned after
    ``timeout_s``; it goes on in a daemon thread and the process can still exit."""
    t = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        logging.getLogger("climbrl.wire").warning(
            "ZeroMQ context still open after %.0fs (a socket not closed); going on", timeout_s
        )
        return False
    return True


class LogLimiter:
    """Logs a repeated event at most once per ``every_s`` per key, with the count of the lines
    it held back, so a flood of bad frames cannot flood the log (or the disk)."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, max_keys: int = 1024):
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last logged, held back since)

    def __call__(self, level: int, key: str, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``every_s`` ago; True if
        logged."""
        now = time.monotonic()
        last, held = self._last.get(key, (-float("inf"), 0))
        if now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return False
        if key not in self._last and len(self._last) >= self.max_keys:
            self._last.clear()  # many distinct keys (peer ids): keep the table bounded
        self._last[key] = (now, 0)
        if held:
            msg += f" ({held} more like it in the last {now - last:.0f}s not logged)"
        self.logger.log(level, msg, *args)
        return True


class Codec:
    """Typed encoder/decoder for one side of a socket."""

    def __init__(self, accepts: dict[bytes, type[_Msg]]):
        self.accepts = accepts
        self._decoders = {k: msgspec.msgpack.Decoder(t) for k, t in accepts.items()}

    @staticmethod
    def encode(msg: _Msg, tensors: list[Any] | None = None) -> list[Any]:
        """Frames for ``msg``; ``tensors`` are torch tensors sent as zero-copy frames."""
        frames: list[Any] = [KIND_OF[type(msg)], _encoder.encode(msg)]
        for t in tensors or ():
            frames.append(tensor_buffer(t))
        return frames

    def decode(self, frames: list[Any]) -> tuple[_Msg, list[Any]]:
        """(message, tensor frames). Raises WireError for anything not acceptable here."""
        if len(frames) < 2:
            raise WireError(f"expected at least 2 frames (kind, body), got {len(frames)}")
        kind = bytes(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
        dec = self._decoders.get(kind)
        if dec is None:
            raise WireError(f"message kind {kind[:32]!r} is not accepted on this socket")
        body = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
        try:
            msg = dec.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise WireError(f"bad {kind.decode(errors='replace')} body: {e}") from None
        if msg.schema != SCHEMA_VERSION:
            raise WireError(f"schema version {msg.schema} != {SCHEMA_VERSION}; upgrade the peer")
        return msg, list(frames[2:])


# ---------------------------------------------------------------- tensors as frames

_DTYPES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}


def dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def tensor_meta(name: str, t: Any) -> TensorMeta:
    return TensorMeta(name, dtype_name(t), list(t.shape))


def tensor_buffer(t: Any) -> memoryview:
    """A memoryview over a contiguous CPU tensor's bytes (no copy for contiguous tensors)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_from_frame(meta: TensorMeta, frame: Any) -> Any:
    """A torch tensor viewing ``frame``'s bytes (zero-copy; keep the frame alive)."""
    import torch

    if meta.dtype not in _DTYPES:
        raise WireError(f"tensor {meta.name!r}: unsupported dtype {meta.dtype!r}")
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    n = 1
    for s in meta.shape:
        n *= s
    if buf.nbytes != n * _DTYPES[meta.dtype]:
        raise WireError(
            f"tensor {meta.name!r}: frame has {buf.nbytes} bytes, "
            f"shape {meta.shape} of {meta.dtype} needs {n * _DTYPES[meta.dtype]}"
        )
    if n == 0:
        return torch.empty(meta.shape, dtype=getattr(torch, meta.dtype))
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(getattr(torch, meta.dtype)).view(meta.shape)


def nbytes_of(meta: TensorMeta) -> int:
    n = _DTYPES[meta.dtype]
    for s in meta.shape:
        n *= s
    return n
