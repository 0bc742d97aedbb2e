"""Ray launcher: the learner and N rollout servers placed as Ray actors on a cluster.

    climbrl run CONFIG.toml --launcher ray [--set ray.address=HEAD:6379] [--resume]

The same config runs under both launchers; the ``[ray]`` section only says where and with
which resources. One placement group holds a bundle for the learner (``ray.learner_cpus`` /
``ray.learner_gpus``) and one per rollout server (``ray.rollout_cpus`` / ``ray.rollout_gpus``).
Each bundle gets a small ``ProcessActor`` that runs the *same* ``climbrl learn`` / ``climbrl
rollout`` command as the local launcher, through its ``Child`` (own process group, death
signal, descendants recorded and killed at the end), so the vLLM engine and the learner run
exactly as they do locally. Ray sets ``CUDA_VISIBLE_DEVICES`` of a GPU bundle, and the command
inherits it.

ZeroMQ stays the data plane. Ray only places the processes, supervises them (this driver polls
each actor through ``climbrl.supervisor``, the local launcher's supervisor: a dead process, a
dead actor or a lost node is a dead child, and ``run.on_child_death`` applies; a restarted
server gets a new actor in its bundle) and passes addresses: the learner actor reads the
endpoint file the learner writes on its node and hands it back, with a wildcard bind
(``wire.host = "0.0.0.0"``) rewritten to the learner node's IP so servers on other nodes can
connect. While ``wire.host`` is loopback the
placement is STRICT_PACK (one node), since no other node could reach the learner.

On Ctrl-C, SIGTERM or the end of the run every actor stops its process (SIGTERM, then SIGKILL
to the group and to every recorded descendant), the actors are killed and the placement group
removed. When an actor dies without stopping its process (killed, its worker or the driver
gone), the process gets SIGTERM from the parent-death signal, and the actor's
``climbrl.reaper`` ends the rest of the process's session (vLLM's engine core and workers).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from climbrl import reaper
from climbrl.commands import learn_command, rollout_command
from climbrl.config import Config, dump_toml
from climbrl.launcher import Child, run_report, watch_run
from climbrl.supervisor import Supervisor, stop_all

log = logging.getLogger("climbrl.launcher_ray")

LOOPBACK = ("127.", "localhost", "::1")
WILDCARD = {"0.0.0.0", "*", "::", "[::]", ""}
# The driver's environment that the placed processes get too (Ray workers start from the
# raylet's environment, not the driver's), so a config behaves as under the local launcher.
FORWARD_ENV_PREFIXES = (
    "CLIMBRL_",
    "VLLM_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TORCH_",
    "OMP_",
    "MKL_",
    "PYTHONPATH",
    "NCCL_",
    "GLOO_",
)


def is_loopback(host: str) -> bool:
    return host.startswith(LOOPBACK)


def reachable_endpoint(endpoint: str, node_ip: str) -> str:
    """``tcp://0.0.0.0:P`` (a wildcard bind) -> ``tcp://NODE_IP:P``; others unchanged."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"learner endpoint {endpoint!r} is not tcp://host:port")
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host in WILDCARD:
        host = f"[{node_ip}]" if ":" in node_ip else node_ip
    return f"tcp://{host}:{port}"


def placement_strategy(cfg: Config) -> str:
    if cfg.ray.placement_strategy != "auto":
        return cfg.ray.placement_strategy
    return "STRICT_PACK" if is_loopback(cfg.wire.host) else "PACK"


def bundles(cfg: Config) -> list[dict[str, float]]:
    """Bundle 0: the learner; bundles 1..N: the rollout servers. Zero amounts are left out."""

    def b(cpus: float, gpus: float) -> dict[str, float]:
        out = {"CPU": cpus, "GPU": gpus}
        return {k: v for k, v in out.items() if v > 0} or {"CPU": 0.001}

    from climbrl.placement import ray_num_gpus

    r = cfg.ray
    # the actors' num_gpus follow their bundle: placement.mode, or ray.*_gpus when set
    learner_gpus, rollout_gpus = ray_num_gpus(cfg)
    return [b(r.learner_cpus, learner_gpus)] + [
        b(r.rollout_cpus, rollout_gpus) for _ in range(cfg.rollout.num_servers)
    ]


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}


class ProcessActor:
    """Runs one climbrl command on its Ray node, through the local launcher's ``Child``.

    Methods run one at a time on the actor's main thread, so the child's parent-death signal
    (sent when the thread that forked it ends) fires only when the actor itself goes away. A
    ``climbrl.reaper`` started next to the child gets the same signal and ends the child's whole
    session (vLLM's engine core and workers too) when the actor dies without stopping it.
    """

    def __init__(self, name: str, log_path: str, cwd: str, env: dict[str, str]):
        self.name = name
        self.log_path = Path(log_path)
        self.child: Child | None = None
        self.reaper: subprocess.Popen | None = None
        os.environ.update(env)
        if Path(cwd).is_dir():  # the driver's folder, when this node has it (same as local)
            os.chdir(cwd)

    def start(self, argv: list[str], files: dict[str, str]) -> dict[str, Any]:
        import ray

        for path, text in files.items():  # the resolved config, on nodes without a shared FS
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists() or p.read_text() != text:
                tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.child = Child(
            self.name, [sys.executable, *argv[1:]] if argv[0] == "python" else argv, self.log_path
        )
        self.reaper = reaper.start(self.child.pid)
        return {
            "pid": self.child.pid,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "actor_pid": os.getpid(),
        }

    def poll(self) -> int | None:
        if self.child is None:
            return None
        self.child.track()
        return self.child.poll()

    def pids(self) -> list[int]:
        """The process and every descendant seen so far (for supervision and tests)."""
        if self.child is None:
            return []
        self.child.track()
        return [self.child.pid, *self.child.known]

    def read_file(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    def tail(self, n: int = 25) -> str:
        return self.child.tail(n) if self.child is not None else ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        if self.child is None:
            return None
        self.child.stop(grace_s)
        if self.reaper is not None:  # it ends what is left of the child's session, and exits
            self.reaper.terminate()
            try:
                self.reaper.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
        return self.child.poll()


class RayChild:
    """The driver's handle on a ProcessActor (in placement-group bundle ``bundle``, running
    ``argv``), shaped like ``launcher.Child`` for ``climbrl.supervisor``."""

    def __init__(
        self,
        name: str,
        actor: Any,
        info: dict[str, Any],
        log_path: Path,
        bundle: int = 0,
        argv: list[str] | None = None,
    ):
        self.name, self.actor, self.info, self.log_path = name, actor, info, log_path
        self.bundle, self.argv = bundle, list(argv or [])
        self.dead_rc: int | None = None

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def track(self) -> None:  # the actor tracks descendants itself, on every poll
        pass

    def poll(self) -> int | None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self.dead_rc is not None:
            return self.dead_rc
        try:
            return ray.get(self.actor.poll.remote(), timeout=60)
        except GetTimeoutError:
            return None
        except RayActorError as e:  # the actor, its worker or its node is gone
            log.error("%s: its Ray actor died: %s", self.name, e)
            self.dead_rc = -int(signal.SIGKILL)
            return self.dead_rc

    def tail(self, n: int = 25) -> str:
        import ray

        if self.dead_rc is None:
            try:
                return ray.get(self.actor.tail.remote(n), timeout=20)
            except Exception:  # noqa: BLE001 - fall back to the log file if it is visible here
                pass
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return f"({self.name}: log not readable from this node)"

    def stop(self, grace_s: float = 10.0) -> None:
        import ray

        try:
            ray.get(self.actor.stop.remote(grace_s), timeout=grace_s + 30)
        except Exception as e:  # noqa: BLE001 - a dead actor's process got its death signal
            log.warning(
                "%s: stop through its actor failed (%s); killing the actor",
                self.name,
                type(e).__name__,
            )
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass


def _connect(cfg: Config) -> str:
    """ray.init per ``ray.address``; returns how it connected (for the log). A private local
    cluster gets at least the CPUs the run asks for (logical CPUs: like the local launcher, a
    small machine is oversubscribed rather than refused)."""
    import ray

    kw: dict[str, Any] = dict(
        namespace=cfg.ray.namespace, log_to_driver=False, logging_level=logging.WARNING
    )
    want = sum(b.get("CPU", 0.0) for b in bundles(cfg))
    local = dict(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, math.ceil(want)))
    addr = cfg.ray.address
    if addr == "local":
        ray.init(**local, **kw)
        return "a private local cluster"
    if addr:
        ray.init(address=addr, **kw)
        return addr
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)  # honours RAY_ADDRESS
        return os.environ["RAY_ADDRESS"]
    try:
        ray.init(address="auto", **kw)
        return "the cluster running on this machine"
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(**local, **kw)
        return "a private local cluster"


def _check_resources(need: list[dict[str, float]]) -> None:
    import ray

    have = ray.cluster_resources()
    total: dict[str, float] = {}
    for b in need:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    short = {k: (v, have.get(k, 0.0)) for k, v in total.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        raise RuntimeError(
            "the Ray cluster is too small for this run: "
            + ", ".join(f"{k} needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
            + "; lower ray.*_cpus / ray.*_gpus or rollout.num_servers, or add nodes"
        )


def launch_ray(cfg: Config, resume: bool = False, live: bool = True) -> int:
    """Place and supervise the run on Ray; returns its exit code. Progress shows as under the
    local launcher: a live bar on a terminal (``live``), else one line per step."""
    try:
        import ray
    except ImportError:
        print(
            "climbrl: --launcher ray needs Ray: pip install 'climbrl[ray]' (or bash "
            "scripts/install.sh)",
            file=sys.stderr,
        )
        return 2
    from ray import exceptions as ray_exceptions
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    out = Path(cfg.run.output_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cfg_text = dump_toml(cfg)
    cfg_path = out / "config.resolved.toml"
    cfg_path.write_text(cfg_text)
    ep_file = out / "endpoint"
    ep_file.unlink(missing_ok=True)
    stopping: dict[str, Any] = {"sig": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    children: list[RayChild] = []
    pg = None
    rc = 1
    try:
        how = _connect(cfg)
        need = bundles(cfg)
        strategy = placement_strategy(cfg)
        print(
            f"climbrl: Ray launcher on {how}: {len(need)} bundles {need}, {strategy}",
            file=sys.stderr,
            flush=True,
        )
        _check_resources(need)
        pg = placement_group(need, strategy=strategy, name=f"climbrl-{cfg.run.name}-{os.getpid()}")
        try:
            ray.get(pg.ready(), timeout=cfg.ray.placement_timeout_s)
        except ray_exceptions.GetTimeoutError:
            raise RuntimeError(
                f"the Ray cluster did not grant the placement group {need} ({strategy}) within "
                f"{cfg.ray.placement_timeout_s:.0f}s: not enough free resources on "
                f"{'one node' if strategy.startswith('STRICT_PACK') else 'the cluster'}"
            ) from None
        Actor = ray.remote(ProcessActor)
        env = forwarded_env()
        files = {str(cfg_path): cfg_text}

        rollout_env: dict[str, str] = {}

        def place(i: int, name: str, argv: list[str], log_path: Path) -> RayChild:
            """Start ``argv`` in an actor on bundle ``i`` (also used to restart a server)."""
            b = need[i]
            actor_env = env if i == 0 else {**env, **rollout_env}
            actor = Actor.options(
                num_cpus=b.get("CPU", 0),
                num_gpus=b.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i
                ),
            ).remote(name, str(log_path), os.getcwd(), actor_env)
            # ray.get is typed for lists of refs too; start returns dict[str, Any]
            info = cast(
                "dict[str, Any]",
                ray.get(actor.start.remote(argv, files), timeout=cfg.ray.start_timeout_s),
            )
            print(
                f"climbrl: {name} pid {info['pid']} on {info['hostname']} ({info['node_ip']}, "
                f"Ray node {info['node_id'][:12]})",
                file=sys.stderr,
                flush=True,
            )
            return RayChild(name, actor, info, log_path, i, argv)

        # "python": the actor runs its own interpreter (ProcessActor.start); FSDP2: torchrun
        # starts one learner per GPU
        learner_argv = learn_command(cfg, cfg_path, ep_file, resume, python="python")
        learner = place(0, "learner", learner_argv, out / "logs" / "learner.log")
        children.append(learner)
        deadline = time.monotonic() + cfg.ray.start_timeout_s
        endpoint = None
        while endpoint is None:
            if learner.poll() is not None or time.monotonic() > deadline or stopping["sig"]:
                raise RuntimeError("the learner did not start:\n" + learner.tail())
            text = cast(
                "str | None", ray.get(learner.actor.read_file.remote(str(ep_file)), timeout=60)
            )
            if text and text.strip():
                endpoint = reachable_endpoint(text.strip(), learner.info["node_ip"])
            else:
                time.sleep(0.2)
        print(f"climbrl: learner endpoint {endpoint}", file=sys.stderr, flush=True)
        rollout_env.update(_rollout_keys_env(cfg, learner, out))
        for i in range(cfg.rollout.num_servers):
            argv = rollout_command(cfg_path, endpoint, f"r{i}", python="python")
            children.append(place(i + 1, f"rollout-{i}", argv, out / "logs" / f"rollout-{i}.log"))
        rc = _supervise(cfg, children, learner, stopping, place, live)
    except (RuntimeError, ray_exceptions.RayError) as e:
        print(f"climbrl: {e}", file=sys.stderr)
        rc = 1
    finally:
        stop_all(children)
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        if ray.is_initialized():
            ray.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
    print(run_report(out, rc), flush=True)  # what this machine sees of the output folder
    return rc


def _rollout_keys_env(cfg: Config, learner: RayChild, out: Path) -> dict[str, str]:
    """The run's wire credentials for the rollout servers, read from the learner's node (it
    writes them before its endpoint): servers on other machines do not see its output folder.
    They travel to the actors through Ray (the cluster's own channel) in
    ``CLIMBRL_WIRE_KEYS``, without the learner's secret key."""
    import ray

    from climbrl.wirekeys import ENV_VAR, FILE_NAME, RunKeys

    path = out / FILE_NAME
    text = cast("str | None", ray.get(learner.actor.read_file.remote(str(path)), timeout=60))
    if not text:
        raise RuntimeError(f"the learner wrote no wire credentials to {path}")
    return {ENV_VAR: RunKeys.parse(text, str(path)).client_json()}


def _supervise(
    cfg: Config,
    children: list[RayChild],
    learner: RayChild,
    stopping: dict,
    place: Callable[[int, str, list[str], Path], RayChild],
    live: bool = False,
) -> int:
    """Poll every actor until the run ends (``climbrl.supervisor``); returns its exit code.

    A dead rollout server (its process, its actor or its node) follows ``run.on_child_death``;
    'restart' starts the same command again in a new actor in the same bundle. Progress comes
    from ``metrics.jsonl`` when this machine sees the learner's output folder: a live bar on a
    terminal (``live``), else one line per step.
    """
    sup = Supervisor(
        children,
        learner,
        lambda c: place(c.bundle, c.name, c.argv, c.log_path),
        on_child_death=cfg.run.on_child_death,
        max_restarts=cfg.run.max_restarts,
    )
    return watch_run(sup, cfg, stopping, live)
