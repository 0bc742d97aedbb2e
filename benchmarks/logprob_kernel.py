"""Benchmark: chunked (and Triton) log-prob + entropy against the naive full-logits path.

For vocab sizes 32k and 152k it times forward + backward of
``sum(a * logp) + 0.01 * sum(ent)`` (gradients to hidden and LM-head weight) and measures the
peak memory above the inputs, for the naive reference and the chunked implementation, in the
same run. On CPU each (impl, vocab) runs in its own subprocess so that the peak RSS belongs to
it alone; on CUDA it uses torch.cuda.max_memory_allocated and adds the Triton kernel.

Run:  python benchmarks/logprob_kernel.py                 # CPU, about 3 minutes on 2 cores
      python benchmarks/logprob_kernel.py --tokens 4096 --hidden 1024 --reps 3
Goal on CPU: chunked peak memory <= 1/4 of naive at <= 1.1x the time.
The last line printed is one JSON object with the ratios and the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VOCABS = (32768, 152064)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _make_inputs(n: int, h: int, v: int, device: str):  # noqa: ANN202 - torch imported late
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    # in place so no temporary raises the peak before the measurement starts
    hidden = torch.randn(n, h, generator=g, device=device).mul_(2.0 / h**0.5).requires_grad_()
    weight = torch.randn(v, h, generator=g, device=device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    a = torch.randn(n, generator=g, device=device)
    return hidden, weight, targets, a


def _step(impl: str, hidden, weight, targets, a) -> None:  # noqa: ANN001
    from climbrl.kernels import token_logprobs_and_entropy

    logp, ent = token_logprobs_and_entropy(hidden, weight, targets, impl=impl)
    ((logp * a).sum() + 0.01 * ent.sum()).backward()
    hidden.grad = None
    weight.grad = None


def memory_worker(impl: str, n: int, h: int, v: int, threads: int) -> dict:
    """Peak RSS above the inputs during one forward + backward, alone in this process."""
    import torch

    torch.set_num_threads(threads)
    inputs = _make_inputs(n, h, v, "cpu")
    base = _rss_bytes()
    assert _peak_rss_bytes() <= base + (64 << 20), "setup left a transient peak"
    t0 = time.perf_counter()
    _step(impl, *inputs)
    return {"peak_bytes": _peak_rss_bytes() - base, "first_s": time.perf_counter() - t0}


def timing_worker(n: int, h: int, v: int, reps: int, threads: int) -> dict:
    """Alternate naive and chunked steps, so load from other processes hits both alike."""
    import torch

    torch.set_num_threads(threads)
    inputs = _make_inputs(n, h, v, "cpu")
    times: dict[str, list[float]] = {"naive": [], "chunked": []}
    for i in range(reps + 1):  # the first pair warms up
        for impl in ("naive", "chunked"):
            t0 = time.perf_counter()
            _step(impl, *inputs)
            if i:
                times[impl].append(time.perf_counter() - t0)
    pair_ratios = [c / n_ for c, n_ in zip(times["chunked"], times["naive"], strict=True)]
    return {"times_s": times, "pair_ratios": pair_ratios}


def _sub(args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
    cmd += ["--reps", str(args.reps), "--threads", str(args.threads), *extra]
    env = dict(os.environ)
    env.pop("CLIMBRL_LOGPROB_IMPL", None)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_cpu(args: argparse.Namespace) -> dict:
    out: dict = {}
    for v in VOCABS:
        row: dict = {}
        for impl in ("naive", "chunked"):
            row[impl] = _sub(args, ["--worker", impl, "--vocab", str(v)])
        t = _sub(args, ["--timing", "--vocab", str(v)])
        for impl in ("naive", "chunked"):
            row[impl]["times_s"] = t["times_s"][impl]
            row[impl]["time_s"] = statistics.median(t["times_s"][impl])
            print(f"V={v:>6} {impl:>8}: time {row[impl]['time_s']:.3f}s "
                  f"(all {[round(x, 3) for x in row[impl]['times_s']]}), "
                  f"peak +{row[impl]['peak_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
        row["mem_ratio"] = row["chunked"]["peak_bytes"] / row["naive"]["peak_bytes"]
        # median of per-pair ratios: each pair ran back to back under the same load
        row["time_ratio"] = statistics.median(t["pair_ratios"])
        row["pair_time_ratios"] = t["pair_ratios"]
        out[str(v)] = row
    return out


def run_cuda(args: argparse.Namespace) -> dict:
    import torch

    from climbrl.kernels import triton_available

    impls = ["naive", "chunked"] + (["triton"] if triton_available() else [])
    out: dict = {}
    for v in VOCABS:
        row: dict = {}
        for impl in impls:
            inputs = _make_inputs(args.tokens, args.hidden, v, "cuda")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _step(impl, *inputs)  # warm-up / compile, and the peak
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            times = []
            for _ in range(args.reps):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                _step(impl, *inputs)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            row[impl] = {"peak_bytes": peak, "times_s": times, "time_s": statistics.median(times)}
            print(f"V={v:>6} {impl:>8}: time {row[impl]['time_s'] * 1000:.2f} ms, "
                  f"peak +{peak / 2**20:.0f} MiB", flush=True)  # fmt: skip
            del inputs
        for impl in impls[1:]:
            row[f"{impl}_mem_ratio"] = row[impl]["peak_bytes"] / row["naive"]["peak_bytes"]
            row[f"{impl}_time_ratio"] = row[impl]["time_s"] / row["naive"]["time_s"]
        out[str(v)] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=2048, help="N, tokens per step")
    p.add_argument("--hidden", type=int, default=512, help="H, hidden size")
    p.add_argument("--reps", type=int, default=3, help="timed steps (pairs on CPU) after a warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present"
    )
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = memory_worker(args.worker, args.tokens, args.hidden, args.vocab, args.threads)
        print(json.dumps(res))
        return
    if args.timing:
        print(
            json.dumps(timing_worker(args.tokens, args.hidden, args.vocab, args.reps, args.threads))
        )
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run_cuda(args) if device == "cuda" else run_cpu(args)
    summary = {
        "bench": "logprob_kernel",
        "device": device,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "threads": args.threads if device == "cpu" else None,
        "ratios": {
            v: {k: round(x, 4) for k, x in r.items() if k.endswith("_ratio")}
            for v, r in results.items()
        },
        "goal": "cpu: chunked mem_ratio <= 0.25 and time_ratio <= 1.1",
        "raw": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
