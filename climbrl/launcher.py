"""Local launcher: the learner and N rollout servers as separate OS processes.

    climbrl run CONFIG.toml [--set learner.total_steps=20] [--resume]

Writes ``OUTPUT_DIR/config.resolved.toml`` and hands it to every process, starts the learner
(which binds the ZeroMQ endpoint on loopback and writes it to a file), then the rollout
servers. Shows progress from ``metrics.jsonl``: on a terminal a live bar with an ETA and a
table of the last steps, elsewhere one line per step. Each child runs in its own process
group; ``climbrl.supervisor`` watches them and applies ``run.on_child_death`` (stop, continue,
or restart a dead rollout server under the same server id, up to ``run.max_restarts`` times).
On Ctrl-C, SIGTERM or the end of the run every group is terminated, then killed, by PID, so
nothing is orphaned. vLLM's engine core runs in a process group of its own, so a ``Child``
also records every descendant (PID + start time, safe from PID reuse) while it is watched,
and kills the ones still running when it stops.
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

from climbrl.commands import learn_command, rollout_command
from climbrl.config import Config, dump_toml
from climbrl.metrics import read_metrics
from climbrl.supervisor import Supervisor, stop_all


def _die_with_parent() -> None:
    """Child preexec: get SIGTERM if the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class Child:
    """One command run as a process group on this machine, its output in ``log_path``."""

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
            acc += f"{_pct(after)} after" if after is not None else "not measured after"
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
    stopping: dict[str, Any] = {"sig": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rc = 1
    try:
        # one process, or learner.fsdp: torchrun starts learner.world_size ranks (rank 0 binds
        # the endpoint and writes the file)
        learner = Child(
            "learner",
            learn_command(cfg, cfg_path, ep_file, resume),
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
            argv = rollout_command(cfg_path, endpoint, f"r{i}")
            log_path = out / "logs" / f"rollout-{i}.log"
            env = placement.child_env(plan, i, visible)
            children.append(Child(f"rollout-{i}", argv, log_path, env))
        rc = _monitor(cfg, children, learner, stopping, live)
    except RuntimeError as e:
        print(f"climbrl: {e}", file=sys.stderr)
        rc = 1
    finally:
        stop_all(children)
        for s, h in old.items():
            signal.signal(s, h)
    print(run_report(out, rc), flush=True)
    return rc


def _monitor(cfg: Config, children: list[Child], learner: Child, stopping: dict, live: bool) -> int:
    """Supervise ``children`` until the run ends (``climbrl.supervisor``) while showing its
    progress; returns the run's exit code. A restarted child replaces its entry in
    ``children``."""
    from rich.console import Console

    console = Console(stderr=True)
    sup = Supervisor(
        children,
        learner,
        lambda c: Child(c.name, c.argv, c.log_path, c.env),
        on_child_death=cfg.run.on_child_death,
        max_restarts=cfg.run.max_restarts,
        console=console,
    )
    return watch_run(sup, cfg, stopping, live)


def watch_run(sup: Supervisor[Any], cfg: Config, stopping: dict, live: bool) -> int:
    """``sup.watch`` with the run's progress: on a terminal (and ``live``) a live bar and
    table, else one plain line per step. Returns the run's exit code."""
    view = RunView(cfg, sup.console)
    if live and sup.console.is_terminal:
        from rich.live import Live

        with Live(view.render(), console=sup.console, refresh_per_second=2) as lv:
            return sup.watch(lambda: stopping["sig"], 0.5, lambda: lv.update(view.render()))
    return sup.watch(lambda: stopping["sig"], 1.0, view.print_new_steps)


class RunView:
    """A run's progress from ``metrics.jsonl``: a bar with an ETA over a table of the last
    steps (``render``, for a terminal), or one plain line per new step (``print_new_steps``).
    While the learner evaluates (``eval_progress.json``), a second bar shows the evaluation."""

    def __init__(self, cfg: Config, console: Any) -> None:
        from climbrl.progress import progress_bar

        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.total = cfg.learner.total_steps
        self.last_step = -1
        self.bar = progress_bar(console)
        self.task = self.bar.add_task("steps", total=self.total)
        self.eval_task: Any = None
        self.eval_key: tuple[str, int] | None = None  # (split, step) of the eval on its bar

    def update_eval(self) -> None:
        """The evaluation bar: added when an evaluation starts, removed when it ends."""
        from climbrl.progress import read_eval_progress

        ev = read_eval_progress(self.out)
        key = None if ev is None else (str(ev["split"]), int(ev.get("step", 0)))
        if key != self.eval_key and self.eval_task is not None:
            self.bar.remove_task(self.eval_task)
            self.eval_task = None
        self.eval_key = key
        if ev is None:
            return
        if self.eval_task is None:
            self.eval_task = self.bar.add_task(
                f"eval {ev['split']} @ step {ev.get('step', 0)}", total=ev["total"]
            )
        self.bar.update(self.eval_task, completed=ev["done"])

    def table(self, recs: list[dict[str, Any]]) -> Any:
        from rich.table import Table

        steps = [r for r in recs if "reward" in r]
        evals = [r for r in recs if any(k.startswith("eval/") for k in r)]
        keys = step_keys(steps[-8:])
        t = Table(title=f"climbrl run {self.cfg.run.name}", show_header=True)
        t.add_column("step")
        for k in keys:
            t.add_column(k)
        for r in steps[-8:]:
            t.add_row(f"{r['step']}/{self.total}", *[_fmt(r.get(k)) for k in keys])
        for r in evals:
            t.caption = " ".join(f"{k}={_fmt(v)}@{r['step']}" for k, v in r.items() if "/" in k)
        return t

    def render(self) -> Any:
        from rich.console import Group

        recs = read_metrics(self.metrics_path)
        done = max((r["step"] for r in recs if "reward" in r), default=0)
        self.bar.update(self.task, completed=done)
        self.update_eval()
        return Group(self.bar, self.table(recs))

    def print_new_steps(self) -> None:
        for r in read_metrics(self.metrics_path):
            if "reward" in r and r["step"] > self.last_step:
                self.last_step = r["step"]
                print(step_line(r, self.total), flush=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
