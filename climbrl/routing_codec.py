"""MoE routing on the wire: ``wire.Routing`` <-> an int64 array [T, layers, top_k].

The rollout encodes the experts every input position was routed to in every layer
(``climbrl.rollout.replay``); the learner decodes them to force the same routing
(``climbrl.learner.replay``). -1 in the array is a position or layer that was not recorded;
on the wire it is 255 (uint8, expert ids < 255) or -1 (int16, expert ids < 32767).

Tests: ``pytest tests/unit/test_replay_learner.py -k routing``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# the wire's "not recorded" value per dtype
UNSET = {"uint8": 255, "int16": -1}


def decode_routing(r: Any) -> np.ndarray:
    """``wire.Routing`` -> int64 array [T, layers, top_k] with -1 where not recorded."""
    if r.dtype not in UNSET:
        raise ValueError(f"routing dtype must be one of {sorted(UNSET)}; got {r.dtype!r}")
    if len(r.shape) != 3:
        raise ValueError(f"routing shape must be [T, layers, top_k]; got {r.shape}")
    arr = np.frombuffer(r.data, dtype=np.dtype(r.dtype))
    if arr.size != int(np.prod(r.shape)):
        raise ValueError(
            f"routing data holds {arr.size} ids, shape {r.shape} needs {int(np.prod(r.shape))}"
        )
    out = arr.reshape(r.shape).astype(np.int64)
    out[out == UNSET[r.dtype]] = -1
    return out


def encode_routing(experts_TNK: np.ndarray) -> dict[str, Any]:
    """The inverse of ``decode_routing`` (-1 = not recorded), as ``wire.Routing`` fields."""
    a = np.asarray(experts_TNK)
    if a.ndim != 3:
        raise ValueError(f"routing must be [T, layers, top_k]; got shape {a.shape}")
    if a.size and int(a.max()) < 255:
        dtype = "uint8"
    elif not a.size or int(a.max()) < 32767:
        dtype = "int16"
    else:
        raise ValueError("routing supports expert ids < 32767")
    b = a.astype(np.int64)
    b[b < 0] = UNSET[dtype]
    return {"dtype": dtype, "shape": list(a.shape), "data": b.astype(dtype).tobytes()}
