"""OutputTail: what child processes write to the inherited stdout and stderr passes through
unchanged, and
the last exception line (without vLLM's log prefix) is kept to name an engine's death."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import subprocess, sys
from climbrl.rollout.output_tail import OutputTail
tail = OutputTail.install()
print(tail.last_exception(), flush=True)
child = (
    "import sys\n"
    "p = '(Worker pid=7) ERROR 12-07 15:14:36 [multiproc_executor.py:1063] '\n"
    "sys.stdout.write(p + 'Traceback (most recent call last):\\n')\n"
    "sys.stdout.write(p + '    gen.set_offset(gen.get_offset() - 4)\\n')\n"
    "sys.stdout.write(p + 'RuntimeError: CPU Generator does not use offset\\n')\n"
    "sys.stdout.flush()\n"
    "sys.stderr.write('vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an "
    "issue. See stack trace (above) for the root cause.\\n')\n"
    "sys.stderr.write('unterminated last line')\n"
)
subprocess.run([sys.executable, "-c", child], check=True)
import time; time.sleep(0.3)
cause, n = tail.last_exception(), len(tail.lines())
tail.close()
print(cause)
print(n)
sys.stderr.write("after close\n")
"""


def test_children_output_passes_through_and_the_cause_is_kept():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.splitlines()[-2:] == ["RuntimeError: CPU Generator does not use offset", "6"]
    assert out.stdout.splitlines()[0] == "None"
    assert "RuntimeError: CPU Generator does not use offset\n" in out.stdout
    assert "EngineDeadError" in out.stderr  # passed through, though not taken as the cause
    assert out.stderr.endswith("unterminated last lineafter close\n")


def test_a_vanished_engine_core_is_named_when_no_exception_was_printed():
    from climbrl.rollout.output_tail import OutputTail

    tail = OutputTail({}, max_lines=10)  # no descriptors routed: only the line parsing
    tail._lines.extend(
        [
            "(MainProcess pid=1) WARNING 12-07 15:52:59 [core_client.py:817] [shutdown] MPClient: "
            "engine core exited unexpectedly; starting cleanup",
            "    raise EngineDeadError()",
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
        ]
    )
    assert tail.last_exception() == (
        "MPClient: engine core exited unexpectedly; starting cleanup (no error message: killed?)"
    )
