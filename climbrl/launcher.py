"""Local launcher: the learner and N rollout servers as separate OS processes.

    climbrl run CONFIG.toml [--set learner.total_steps=20] [--resume]

Writes ``OUTPUT_DIR/config.resolved.toml`` and hands it to every process, starts the learner
(which binds the ZeroMQ endpoint on loopback and writes it to a file), then the rollout
servers. Shows progress with rich from ``metrics.jsonl``. Each child runs in its own process
group; on Ctrl-C, SIGTERM, or a child that dies (``run.on_child_death = "stop"``) every group is
terminated, then killed, by PID, so nothing is orphaned. With ``run.on_child_death =
"restart"`` a dead rollout server is cleaned up and started again under the same server id (up
to ``run.max_restarts`` times each); the learner sends it the current weights when it says
Hello. vLLM's engine core runs in a process
group of its own, so the launcher also records every descendant (PID + start time, safe from
PID reuse) while it watches, and kills the ones still running at the end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from climbrl.config import Config, dump_toml
from climbrl.metrics import read_metrics


def _die_with_parent() -> None:
    """Child preexec: get SIGTERM if the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class Child:
    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env  # added to the launcher's environment (its GPUs: climbrl/placement.py)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**os.environ, **env} if env else None,
        )
        self.known: dict[int, float] = {}  # descendant pid -> create_time
        self.reported = False  # its death was reported (on_child_death = "continue")

    def track(self) -> None:
        import psutil

        try:
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                self.known.setdefault(c.pid, c.create_time())
        except psutil.Error:
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace_s: float = 10.0) -> None:
        import psutil

        self.track()
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        for pid, created in self.known.items():  # descendants in other groups (engine core)
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _py() -> list[str]:
    return [sys.executable, "-m", "climbrl.cli"]


# The metrics of a step the progress display shows; STEP_IF_NONZERO ones only where not 0.
STEP_KEYS = [
    "reward",
    "correct",
    "entropy",
    "staleness_mean",
    "mismatch_mean",
    "tokens_per_s",
    "weight_sync_s",
    "stale_dropped",
]
STEP_IF_NONZERO = ["env_errors"]
LEARNER_ERROR = "climbrl learn: error: "  # how `climbrl learn` prints the error that ended it


def step_keys(recs: list[dict[str, Any]]) -> list[str]:
    """The columns for these step records."""
    return STEP_KEYS + [k for k in STEP_IF_NONZERO if any(r.get(k) for r in recs)]


def step_line(r: dict[str, Any], total: int) -> str:
    """One plain progress line for a step record of ``metrics.jsonl``."""
    return f"step {r['step']}/{total} " + " ".join(f"{k}={_fmt(r.get(k))}" for k in step_keys([r]))


def run_report(out: Path, rc: int) -> str:
    """What ``climbrl run`` prints at its end: the held-out accuracy before and after with the
    McNemar p of the change (when evaluation ran), the error that stopped the learner (if one
    did), and where the run's outputs are."""
    import json

    lines = []
    summary_path = out / "summary.json"
    summary: dict[str, Any] = {}
    if rc == 0 and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        lines.append(
            f"climbrl: run finished: {summary.get('steps')} steps in "
            f"{summary.get('elapsed_s', 0.0):.0f}s"
        )
        before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
        change = summary.get("heldout_change")
        if before is None and after is None:
            lines.append("  held-out accuracy: not measured (learner.eval_size = 0)")
        else:
            acc = (
                f"{_pct(before)} before, "
                if before is not None
                else "not measured before (resumed run), "
            )
            acc += f"{_pct(after)} after"
            if change:
                acc += (
                    f" on {change['tasks']} tasks: {change['fixed']} fixed, "
                    f"{change['broken']} broken, McNemar p = {change['mcnemar_p']:.3g}"
                )
            lines.append("  held-out accuracy: " + acc)
        failed = {k: summary.get(k, 0) for k in ("eval_env_errors", "eval_timeouts")}
        if any(failed.values()):
            lines.append(
                f"  eval episodes that failed and scored 0: {failed['eval_env_errors']} "
                f"in the env, {failed['eval_timeouts']} past wire.order_timeout_s "
                "(logs/learner.log quotes the errors)"
            )
    else:
        lines.append(f"climbrl: run failed (exit code {rc})")
        err = _learner_error(out / "logs" / "learner.log")
        if err:
            lines.append(f"  the learner stopped: {err}")
    lines.append(f"  outputs in {out}/:")
    ckpt = out / "checkpoints" / "latest"
    entries = [
        ("summary.json", summary_path.is_file(), "the final summary"),
        ("metrics.jsonl", (out / "metrics.jsonl").is_file(), "one record per step and eval"),
        (
            "checkpoints/",
            ckpt.is_file(),
            "HF checkpoints" + (f", latest {ckpt.read_text().strip()}" if ckpt.is_file() else ""),
        ),
        (
            "logs/",
            (out / "logs").is_dir(),
            ", ".join(sorted(p.name for p in (out / "logs").glob("*.log")))
            if (out / "logs").is_dir()
            else "",
        ),
        (
            "tensorboard/",
            (out / "tensorboard").is_dir(),
            f"tensorboard --logdir {out / 'tensorboard'}",
        ),
    ]
    lines += [f"    {name:<15} {what}" for name, there, what in entries if there]
    return "\n".join(lines)


def _learner_error(log_path: Path) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    # (anywhere in the line: torchrun prefixes a rank's output with its rank)
    found = [x.split(LEARNER_ERROR, 1)[1] for x in text.splitlines() if LEARNER_ERROR in x]
    return found[-1] if found else ""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def launch(cfg: Config, resume: bool = False, live: bool = True) -> int:
    from climbrl import placement

    # which GPUs each child gets (none without CUDA); the config the children read says so
    n_gpus = placement.gpu_count()
    plan = placement.plan_local(cfg, n_gpus)
    cfg = placement.resolve(cfg, plan)
    visible = placement.visible_devices(os.environ, n_gpus)
    out = Path(cfg.run.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.resolved.toml"
    cfg_path.write_text(dump_toml(cfg))
    ep_file = out / "endpoint"
    ep_file.unlink(missing_ok=True)
    children: list[Child] = []
    stopping = {"sig": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = 1
    try:
        from climbrl.learner.fsdp import learner_argv as fsdp_argv

        # one process, or learner.fsdp: torchrun starts learner.world_size ranks (rank 0 binds
        # the endpoint and writes the file)
        learner_argv = fsdp_argv(
            cfg,
            _py()
            + ["learn", "--config", str(cfg_path), "--endpoint-file", str(ep_file)]
            + (["--resume"] if resume else []),
        )
        learner = Child(
            "learner",
            learner_argv,
            out / "logs" / "learner.log",
            placement.child_env(plan, "learner", visible),
        )
        children.append(learner)
        deadline = time.monotonic() + 300
        while not ep_file.exists():
            if learner.poll() is not None or time.monotonic() > deadline or stopping["sig"]:
                raise RuntimeError("the learner did not start:\n" + learner.tail())
            time.sleep(0.2)
        endpoint = ep_file.read_text().strip()
        for i in range(cfg.rollout.num_servers):
            argv = _py() + [
                "rollout",
                "--config",
                str(cfg_path),
                "--endpoint",
                endpoint,
                "--server-id",
                f"r{i}",
            ]
            log_path = out / "logs" / f"rollout-{i}.log"
            env = placement.child_env(plan, i, visible)
            children.append(Child(f"rollout-{i}", argv, log_path, env))
        rc = _monitor(cfg, children, learner, stopping, live)
    except RuntimeError as e:
        print(f"climbrl: {e}", file=sys.stderr)
        rc = 1
    finally:
        for c in reversed(children):
            c.stop()
        for s, h in old.items():
            signal.signal(s, h)
    print(run_report(out, rc), flush=True)
    return rc


def _monitor(cfg: Config, children: list[Child], learner: Child, stopping: dict, live: bool) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console(stderr=True)
    restarts: dict[str, int] = {}
    metrics_path = Path(cfg.run.output_dir) / "metrics.jsonl"
    total = cfg.learner.total_steps
    last_step = -1

    def table(recs: list[dict[str, Any]] | None = None) -> Table:
        recs = read_metrics(metrics_path) if recs is None else recs
        steps = [r for r in recs if "reward" in r]
        evals = [r for r in recs if any(k.startswith("eval/") for k in r)]
        keys = step_keys(steps[-8:])
        t = Table(title=f"climbrl run {cfg.run.name}", show_header=True)
        t.add_column("step")
        for k in keys:
            t.add_column(k)
        for r in steps[-8:]:
            t.add_row(f"{r['step']}/{total}", *[_fmt(r.get(k)) for k in keys])
        for r in evals:
            t.caption = " ".join(f"{k}={_fmt(v)}@{r['step']}" for k, v in r.items() if "/" in k)
        return t

    def check() -> int | None:
        for c in children:
            c.track()
        if stopping["sig"] is not None:
            console.print(f"[yellow]signal {stopping['sig']}: stopping every process[/]")
            return 130
        lrc = learner.poll()
        if lrc is not None:
            if lrc != 0:
                console.print(f"[red]learner exited with {lrc}[/]\n{learner.tail()}")
            return lrc
        for i, c in enumerate(children):
            if c is learner or c.poll() is None:
                continue
            if c.reported:
                continue  # 'continue': reported once, the learner carries on without it
            console.print(f"[red]{c.name} (pid {c.pid}) died with {c.poll()}[/]\n{c.tail()}")
            c.reported = True
            if cfg.run.on_child_death == "stop":
                return 1
            if cfg.run.on_child_death == "restart":
                n = restarts.get(c.name, 0)
                if n >= cfg.run.max_restarts:
                    console.print(
                        f"[red]{c.name} died {n + 1} times "
                        f"(run.max_restarts = {cfg.run.max_restarts}): stopping[/]"
                    )
                    return 1
                restarts[c.name] = n + 1
                c.stop(grace_s=2.0)  # its engine core and anything else it left behind
                children[i] = Child(c.name, c.argv, c.log_path, c.env)
                console.print(
                    f"[yellow]restarted {c.name} as pid {children[i].pid} "
                    f"(restart {n + 1}/{cfg.run.max_restarts})[/]"
                )
        return None

    if live and console.is_terminal:
        from rich.console import Group
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("steps"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        task = bar.add_task("steps", total=total)

        def view() -> Group:
            recs = read_metrics(metrics_path)
            bar.update(task, completed=max((r["step"] for r in recs if "reward" in r), default=0))
            return Group(bar, table(recs))

        with Live(view(), console=console, refresh_per_second=2) as lv:
            while (rc := check()) is None:
                time.sleep(0.5)
                lv.update(view())
        return rc
    while (rc := check()) is None:
        time.sleep(1.0)
        for r in read_metrics(metrics_path):
            if "reward" in r and r["step"] > last_step:
                last_step = r["step"]
                print(step_line(r, total), flush=True)
    return rc


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
