"""`climbrl run --launcher ray` on real Ray clusters of this module's own.

Each cluster is isolated from whatever Ray the machine or the user has: it starts with
``ray start`` in a session of its own, with its own temp dir, free ports, no dashboard, and its
own token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH`` to a fresh file), and every
``RAY_*`` variable of the calling environment is dropped for it and its drivers, so neither a
``~/.ray/auth_token`` nor a ``RAY_ADDRESS`` of the user's reaches the test. It is torn down by
killing its sessions' processes by PID (never ``ray stop``, which stops every Ray on the
machine).

- Default suite: one node on 127.0.0.1; a run trains, then the rollout server's Ray actor is
  killed; the launcher reports the dead actor and stops the run (``run.on_child_death = "stop"``)
  with nothing left behind. The driver runs with a stray, wrong ``~/.ray/auth_token``.
- ``slow``: runs to the end (one server; two over CURVE), the actor killed and restarted, the
  learner killed, and two Ray nodes on this machine (the multi-node recipe of docs/ray.md).
  With multi-node on, Ray swaps the loopback ``--node-ip-address`` for the machine's address
  and its daemons listen there: that cluster relies on its token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import kill_tree, pid_alive, write_config

pytest.importorskip("ray")
pytestmark = pytest.mark.integration

# A copy_first env that also records which rollout server ran each episode.
TAGGED_ENV = """
import sys
from pathlib import Path

from climbrl.envs.tasks import CopyFirstEnv


class TaggedCopyFirst(CopyFirstEnv):
    def __init__(self, record_dir: str = "", **kw):
        super().__init__(**kw)
        self._record = record_dir

    async def reset(self, task):
        if self._record and "--server-id" in sys.argv:
            sid = sys.argv[sys.argv.index("--server-id") + 1]
            with open(Path(self._record) / f"{sid}.episodes", "a") as f:
                f.write(task.task_id + "\\n")
        return await super().reset(task)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getsid(int(p.name)) == sid and pid_alive(int(p.name)):
                    out.append(int(p.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out


def _kill_session(sid: int, grace: float = 5.0) -> None:
    """Kill every process of one session (one node of a throwaway Ray cluster), by PID."""
    for _ in range(2):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class RayCluster:
    """A throwaway Ray cluster on this machine: its address, the environment its drivers
    use, and the session of each node (its daemons and workers stay in it)."""

    root: Path
    env: dict[str, str]
    address: str = ""
    sids: list[int] = field(default_factory=list)

    @property
    def sid(self) -> int:
        return self.sids[0]

    def add_node(self, num_cpus: int = 4) -> None:
        """``ray start`` one node (the head first) in its own session and temp dir."""
        head = not self.sids
        n = len(self.sids)
        port = _free_port() if head else None
        args = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            *(["--head", "--port", str(port)] if head else ["--address", self.address]),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--temp-dir",
            str(self.root / f"n{n}"),
            "--object-store-memory",
            str(100 * 1024**2),
            "--min-worker-port",  # 0: any free port, so two nodes' workers never collide
            "0",
            "--max-worker-port",
            "0",
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--disable-usage-stats",
        ]
        if head:
            args += ["--include-dashboard", "false"]
            args += ["--ray-client-server-port", str(_free_port())]
        log = self.root / f"ray-start-{n}.log"
        with open(log, "wb") as f:
            starter = subprocess.Popen(
                args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        self.sids.append(starter.pid)  # `ray start` leads a new session; the node stays in it
        try:
            rc = starter.wait(timeout=180)
        finally:
            if starter.poll() is None:
                starter.kill()
        assert rc == 0, log.read_text()[-3000:]
        if head:
            self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        for sid in reversed(self.sids):
            _kill_session(sid)
        shutil.rmtree(self.root, ignore_errors=True)


def isolated_ray_env(root: Path, multi_node: bool = False) -> dict[str, str]:
    """This environment without any ``RAY_*`` setting of the user's, plus a token of the
    cluster's own: ``RAY_AUTH_TOKEN_PATH`` outranks ``~/.ray/auth_token``, so a stray token
    file there is never read. One node keeps 127.0.0.1 as its address (Ray swaps a loopback
    ``--node-ip-address`` for the machine's address unless multi-node clusters are off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    token = root / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
    )
    if not multi_node:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def start_cluster(nodes: int = 1, num_cpus: int = 4) -> RayCluster:
    root = Path(tempfile.mkdtemp(prefix="crlray", dir="/tmp"))  # Ray's socket paths stay short
    cluster = RayCluster(root, isolated_ray_env(root, multi_node=nodes > 1))
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def _launch(
    cfg: Path, log: Path, cluster: RayCluster, env: dict[str, str] | None = None
) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "climbrl.cli",
                "run",
                str(cfg),
                "--launcher",
                "ray",
                "--no-live",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **cluster.env,
                "CLIMBRL_LOG": "INFO",
                "RAY_ADDRESS": cluster.address,
                **(env or {}),
            },
        )


def _run_processes(cfg_path: Path) -> dict[int, str]:
    """The climbrl processes of this run (their command line names its config) and, for each,
    its session: every descendant (the vLLM engine core too) stays in that session."""
    import psutil

    found = {}
    needle = str(cfg_path).encode()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
                if needle in cmd and b"climbrl.cli\x00" in cmd and b"\x00run\x00" not in cmd:
                    pid = int(p.name)
                    found[pid] = "learn" if b"\x00learn\x00" in cmd else "rollout"
                    for c in psutil.Process(pid).children(recursive=True):
                        found[c.pid] = "descendant"
            except (OSError, psutil.Error):
                pass
    return found


def _watch(
    proc: subprocess.Popen,
    cfg_path: Path,
    until: Callable[[], bool] | None = None,
    timeout: float = 500,
    seen: dict[int, str] | None = None,
    sids: set[int] | None = None,
) -> tuple[dict[int, str], set[int]]:
    """Record the run's processes (and their sessions) until the launcher exits or `until()`."""
    seen = {} if seen is None else seen
    sids = set() if sids is None else sids
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for pid, role in _run_processes(cfg_path).items():
            seen.setdefault(pid, role)
            try:
                sids.add(os.getsid(pid))
            except ProcessLookupError:
                pass
        if until is not None and until():
            break
        time.sleep(0.5)
    return seen, sids


def _leftovers(seen: dict[int, str], sids: set[int]) -> list[int]:
    deadline = time.monotonic() + 15  # let SIGKILLed processes be reaped
    while True:
        left = sorted(
            {p for p in seen if pid_alive(p)} | {p for s in sids for p in _session_pids(s)}
        )
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _is_actor_worker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ProcessActor")
    except OSError:
        return False


def _actor_workers(cluster: RayCluster) -> list[int]:
    return [p for sid in cluster.sids for p in _session_pids(sid) if _is_actor_worker(p)]


def _listening(cluster: RayCluster) -> set[str]:
    """The addresses the cluster's processes (daemons, actors' workers) listen on."""
    import psutil

    found = set()
    for pid in (p for sid in cluster.sids for p in _session_pids(sid)):
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _no_actor_workers_left(cluster: RayCluster) -> None:
    deadline = time.monotonic() + 30  # Ray reaps the killed actors' workers
    while _actor_workers(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _actor_workers(cluster) == []


def _steps(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "reward" in r]


def _fail_msg(tmp_path: Path, out: Path) -> str:
    parts = [(tmp_path / "launcher.log").read_text()[-3000:]]
    for f in sorted((out / "logs").glob("*.log")) if (out / "logs").is_dir() else []:
        parts.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
    return "\n".join(parts)


def _config(tmp_path: Path, model: Path, out: Path, servers: int, steps: int, **extra) -> Path:
    (tmp_path / "tagged_env.py").write_text(TAGGED_ENV)
    (tmp_path / "episodes").mkdir(exist_ok=True)
    learner = {
        "total_steps": steps,
        "batch_groups": 2 * servers,
        "group_size": 2,
        "max_staleness": 1,
        "eval_size": 0,
        "checkpoint_every": 1,
        **extra.pop("learner", {}),
    }
    return write_config(
        tmp_path / "c.toml",
        model,
        out,
        env={
            "name": f"{tmp_path / 'tagged_env.py'}:TaggedCopyFirst",
            "args.record_dir": str(tmp_path / "episodes"),
        },
        rollout={"num_servers": servers, "max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.5},
        learner=learner,
        **extra,
    )


def _check_checkpoint(out: Path, step: int) -> None:
    d = out / "checkpoints" / f"step_{step}"
    assert json.loads((d / "learner_state.json").read_text())["step"] == step
    assert (d / "model.safetensors").is_file()


def _check_trained(out: Path, steps: int) -> None:
    assert [r["step"] for r in _steps(out)] == list(range(1, steps + 1))
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
    for s in range(1, steps + 1):
        _check_checkpoint(out, s)


def _placed(launcher_log: str, name: str) -> tuple[int, str]:
    """(pid, Ray node id) of a placed process, from the launcher's 'NAME pid P on ...' line."""
    line = next(ln for ln in launcher_log.splitlines() if f"climbrl: {name} pid " in ln)
    pid = int(line.split(f"{name} pid ", 1)[1].split()[0])
    return pid, line.rsplit("Ray node ", 1)[1].rstrip(")")


def _run_to_end(
    tmp_path: Path,
    model: Path,
    cluster: RayCluster,
    servers: int,
    steps: int,
    strategy: str = "STRICT_PACK",
    **extra,
) -> str:
    """Run to the end; checks the training, that each server ran episodes and that nothing is
    left behind. Returns the launcher's log."""
    out = tmp_path / "run"
    cfg = _config(tmp_path, model, out, servers, steps, **extra)
    proc = _launch(cfg, tmp_path / "launcher.log", cluster)
    try:
        seen, sids = _watch(proc, out / "config.resolved.toml")
        rc = proc.wait(timeout=60)
    finally:
        kill_tree(proc)
    assert rc == 0, _fail_msg(tmp_path, out)
    launcher_log = (tmp_path / "launcher.log").read_text()
    assert "Ray launcher on" in launcher_log and strategy in launcher_log
    for i in range(servers):
        assert f"rollout-{i} pid" in launcher_log
    _check_trained(out, steps)
    # every server ran episodes for the learner
    ran = {f.stem: len(f.read_text().splitlines()) for f in (tmp_path / "episodes").iterdir()}
    assert sorted(ran) == [f"r{i}" for i in range(servers)], ran
    assert all(n > 0 for n in ran.values())
    # the run's processes were seen (learner, servers, engine cores) and are all gone now
    roles = sorted(seen.values())
    assert roles.count("learn") == 1 and roles.count("rollout") == servers, seen
    assert roles.count("descendant") >= servers, seen  # each server's vLLM engine core
    assert _leftovers(seen, sids) == [], f"orphaned processes: {seen}"
    _no_actor_workers_left(cluster)
    return launcher_log


def _kill_rollout_actor(
    tmp_path: Path,
    model: Path,
    cluster: RayCluster,
    steps: int,
    policy: str,
    env: dict[str, str] | None = None,
    before_kill: Callable[[], None] = lambda: None,
) -> tuple[int, int, int, dict[int, str], set[int]]:
    """Start a one-server run, wait for its first checkpoint, SIGKILL the Ray worker process
    of the rollout server's actor (the actor dies; its process gets its parent-death signal),
    and wait for the launcher to end. Returns (rc, server pid, actor pid, seen, sessions)."""
    out = tmp_path / "run"
    cfg = _config(tmp_path, model, out, 1, steps, run={"on_child_death": policy})
    proc = _launch(cfg, tmp_path / "launcher.log", cluster, env)
    resolved = out / "config.resolved.toml"
    try:
        seen, sids = _watch(proc, resolved, until=lambda: (out / "checkpoints" / "latest").exists())
        assert proc.poll() is None, _fail_msg(tmp_path, out)
        server = [p for p, r in seen.items() if r == "rollout"]
        assert len(server) == 1, seen
        import psutil

        actor = psutil.Process(server[0]).ppid()
        assert _is_actor_worker(actor), (actor, Path(f"/proc/{actor}/cmdline").read_bytes())
        before_kill()
        os.kill(actor, signal.SIGKILL)
        _watch(proc, resolved, seen=seen, sids=sids)
        rc = proc.wait(timeout=120)
    finally:
        kill_tree(proc)
    return rc, server[0], actor, seen, sids


def test_ray_run_one_node_stops_when_a_rollout_actor_dies(tiny_model, tmp_path, ray_cluster):
    """One node, one server, ``run.on_child_death = "stop"``: the run trains and checkpoints;
    the server's Ray actor is killed; the launcher reports that actor's death with the server
    it ran and stops the run with exit code 1; the checkpoints so far stay whole, and no
    process (learner, server, vLLM engine core) or actor worker is left. The driver sees a
    stray, wrong ``~/.ray/auth_token``: the cluster's own token is the one used. While the run
    trains, every process of the cluster listens on loopback only."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-stray-token-of-another-cluster")
    listening: set[str] = set()
    rc, server, _actor, seen, sids = _kill_rollout_actor(
        tmp_path,
        tiny_model,
        ray_cluster,
        steps=500,
        policy="stop",
        env={"HOME": str(home)},
        before_kill=lambda: listening.update(_listening(ray_cluster)),
    )
    out = tmp_path / "run"
    launcher_log = (tmp_path / "launcher.log").read_text()
    assert rc == 1, _fail_msg(tmp_path, out)
    assert "STRICT_PACK" in launcher_log
    # the cluster (its daemons and the actors' workers) listens on loopback only
    assert listening and all(a.removeprefix("::ffff:").startswith("127.") for a in listening)
    assert _placed(launcher_log, "rollout-0")[0] == server
    assert "rollout-0: its Ray actor died" in launcher_log, launcher_log
    assert f"rollout-0 (pid {server}) died with -9" in launcher_log, launcher_log
    assert "learner exited" not in launcher_log  # the launcher stopped it
    steps = [r["step"] for r in _steps(out)]
    assert steps and steps == list(range(1, len(steps) + 1)), steps
    _check_checkpoint(out, 1)
    roles = sorted(seen.values())
    assert roles.count("learn") == 1 and roles.count("rollout") == 1, seen
    assert _leftovers(seen, sids) == [], f"orphaned processes: {seen}"
    _no_actor_workers_left(ray_cluster)


@pytest.mark.slow
def test_ray_run_restarts_a_dead_rollout_actor(tiny_model, tmp_path, ray_cluster):
    """``run.on_child_death = "restart"``: the killed actor's server is started again in a new
    actor on the same bundle, the learner sees the old one dead and brings the new one to the
    current weights, and the run finishes every step."""
    steps = 4
    rc, server, _actor, seen, sids = _kill_rollout_actor(
        tmp_path, tiny_model, ray_cluster, steps=steps, policy="restart"
    )
    out = tmp_path / "run"
    launcher_log = (tmp_path / "launcher.log").read_text()
    assert rc == 0, _fail_msg(tmp_path, out)
    assert "rollout-0: its Ray actor died" in launcher_log, launcher_log
    assert f"rollout-0 (pid {server}) died with -9" in launcher_log, launcher_log
    assert "restarted rollout-0 as pid" in launcher_log, launcher_log
    learner_log = (out / "logs" / "learner.log").read_text()
    assert "rollout server r0 is dead" in learner_log, _fail_msg(tmp_path, out)
    assert "sending r0 the weights of version" in learner_log, _fail_msg(tmp_path, out)
    _check_trained(out, steps)
    assert _steps(out)[-1]["servers_dead"] == 1
    assert sorted(seen.values()).count("rollout") == 2, seen  # the first server and its restart
    assert _leftovers(seen, sids) == [], f"orphaned processes: {seen}"
    _no_actor_workers_left(ray_cluster)


# The full runs below take a minute or more each on 2 cores; the default suite keeps the one
# above (a one-node run with an actor's death) and the placement rules at the end.
@pytest.mark.slow
def test_ray_launcher_trains_one_server(tiny_model, tmp_path, ray_cluster):
    """One rollout server, two steps, checkpoints, nothing left behind."""
    _run_to_end(tmp_path, tiny_model, ray_cluster, servers=1, steps=2)


@pytest.mark.slow
def test_ray_launcher_trains_two_servers_over_curve(tiny_model, tmp_path, ray_cluster):
    """Two servers, with the run's CURVE keys forced on (as across machines): the servers get
    the client keys through Ray, not from the learner's folder."""
    _run_to_end(tmp_path, tiny_model, ray_cluster, servers=2, steps=3, wire={"curve": "on"})
    out = tmp_path / "run"
    assert "CURVE on" in (out / "logs" / "learner.log").read_text()
    for i in range(2):
        assert "CURVE client" in (log := (out / "logs" / f"rollout-{i}.log").read_text())
        assert "from CLIMBRL_WIRE_KEYS" in log


@pytest.mark.slow
def test_ray_launcher_killed_learner_stops_everything(tiny_model, tmp_path, ray_cluster):
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_model, out, servers=1, steps=500)
    proc = _launch(cfg, tmp_path / "launcher.log", ray_cluster)
    try:
        seen, sids = _watch(
            proc,
            out / "config.resolved.toml",
            until=lambda: (out / "checkpoints" / "latest").exists(),
        )
        assert proc.poll() is None, _fail_msg(tmp_path, out)
        learner = [p for p, r in seen.items() if r == "learn"]
        assert len(learner) == 1, seen
        os.kill(learner[0], signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        kill_tree(proc)
    assert rc != 0
    assert "learner exited with -9" in (tmp_path / "launcher.log").read_text()
    assert (out / "checkpoints" / "step_1" / "learner_state.json").is_file()
    assert _leftovers(seen, sids) == [], f"orphaned processes: {seen}"
    _no_actor_workers_left(ray_cluster)


@pytest.mark.slow
def test_ray_launcher_two_nodes_on_one_machine(tiny_model, tmp_path):
    """The multi-node recipe (docs/ray.md) with a simulated second node: two ``ray start``
    nodes on this machine, ``STRICT_SPREAD`` puts the learner and the rollout server on
    different Ray nodes, CURVE on as across machines, and the run trains to the end."""
    cluster = start_cluster(nodes=2, num_cpus=2)
    try:
        launcher_log = _run_to_end(
            tmp_path,
            tiny_model,
            cluster,
            servers=1,
            steps=2,
            strategy="STRICT_SPREAD",
            ray={"placement_strategy": "STRICT_SPREAD"},
            wire={"curve": "on"},
        )
    finally:
        cluster.stop()
    _, learner_node = _placed(launcher_log, "learner")
    _, server_node = _placed(launcher_log, "rollout-0")
    assert learner_node != server_node, launcher_log


def test_endpoint_placement_and_bundles_follow_the_config():
    """No cluster needed: the address and placement rules of the Ray launcher."""
    from climbrl.config import load_config
    from climbrl.launcher_ray import (
        bundles,
        forwarded_env,
        placement_strategy,
        reachable_endpoint,
    )

    assert reachable_endpoint("tcp://0.0.0.0:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    assert reachable_endpoint("tcp://*:5555", "fd00::7") == "tcp://[fd00::7]:5555"
    assert reachable_endpoint("tcp://127.0.0.1:5555", "10.1.2.3") == "tcp://127.0.0.1:5555"
    assert reachable_endpoint("tcp://10.9.9.9:1", "10.1.2.3") == "tcp://10.9.9.9:1"
    with pytest.raises(ValueError):
        reachable_endpoint("ipc:///tmp/x", "10.1.2.3")
    base = ["model.path=m", "rollout.num_servers=3"]
    cfg = load_config(None, base)
    assert placement_strategy(cfg) == "STRICT_PACK"  # loopback learner: one node
    assert bundles(cfg) == [{"CPU": 1.0}] * 4
    cfg = load_config(
        None, base + ['wire.host="0.0.0.0"', "ray.rollout_gpus=1", "ray.learner_cpus=2"]
    )
    assert placement_strategy(cfg) == "PACK"
    assert bundles(cfg) == [{"CPU": 2.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 3
    cfg = load_config(None, base + ['ray.placement_strategy="SPREAD"'])
    assert placement_strategy(cfg) == "SPREAD"
    env = forwarded_env(
        {
            "CLIMBRL_LOG": "DEBUG",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HOME": "/r",
            "AWS_SECRET_ACCESS_KEY": "x",
        }
    )
    assert env == {"CLIMBRL_LOG": "DEBUG", "VLLM_CPU_KVCACHE_SPACE": "1"}
