"""Finding environments: entry points, then dotted paths, then built-in names; old envs still work."""

from __future__ import annotations

import textwrap

import pytest

from climbrl.envs.base import (
    BUILTIN_ENVS,
    Env,
    StepResult,
    Task,
    Turn,
    available_envs,
    make_env,
    resolve_env,
)
from climbrl.envs.tasks import CopyFirstEnv


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A real installed distribution (dist-info on sys.path) declaring climbrl.envs entry points."""
    (tmp_path / "myplug.py").write_text(
        textwrap.dedent("""
        from climbrl.envs.tasks import CopyFirstEnv
        class PlugEnv(CopyFirstEnv):
            name = "plug"
        class Shadow(CopyFirstEnv):
            name = "shadow"
    """)
    )
    di = tmp_path / "myplug-0.1.dist-info"
    di.mkdir()
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (di / "entry_points.txt").write_text(
        "[climbrl.envs]\nplug = myplug:PlugEnv\nmath = myplug:Shadow\nbroken = myplug:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtin_and_dotted(plugin):
    assert resolve_env("copy_first") is CopyFirstEnv
    assert resolve_env("climbrl.envs.tasks:CopyFirstEnv") is CopyFirstEnv
    assert resolve_env("climbrl.envs.tasks.CopyFirstEnv") is CopyFirstEnv
    assert resolve_env("myplug:PlugEnv").name == "plug"
    file_env = resolve_env(f"{plugin / 'myplug.py'}:PlugEnv")
    assert file_env.name == "plug" and issubclass(file_env, CopyFirstEnv)


def test_entry_points_come_first(plugin):
    assert resolve_env("plug").name == "plug"
    assert resolve_env("math").name == "shadow"  # an entry point shadows the built-in name
    assert available_envs()["plug"] == "myplug:PlugEnv"
    with pytest.raises(ValueError, match="entry point climbrl.envs:broken"):
        resolve_env("broken")


def test_unknown_env_lists_what_is_available(plugin):
    with pytest.raises(ValueError) as e:
        resolve_env("nope")
    msg = str(e.value)
    assert "plug (entry point)" in msg and all(n in msg for n in BUILTIN_ENVS)
    assert "dotted path" in msg
    with pytest.raises(ValueError, match="No module named"):
        resolve_env("no_such_pkg.mod:Env")
    with pytest.raises(ValueError, match="not a subclass"):
        resolve_env("climbrl.envs.base:Task")


class NoTurnHandler(Env):
    def num_tasks(self, split):
        return 1

    def get_task(self, split, index):
        return Task("a", split, "p")

    async def reset(self, task):
        return "p"


def test_env_without_step_or_respond_is_refused():
    with pytest.raises(ValueError, match="step\\(completion\\) or respond\\(turn\\)"):
        resolve_env(f"{__name__}:NoTurnHandler")
    with pytest.raises(ValueError, match="unknown options"):
        make_env("copy_first", {"nope": 1})


async def test_text_protocol_envs_work_through_respond():
    """An old-style step(completion: str) env is driven through respond() unchanged."""

    class Old(Env):
        def num_tasks(self, split):
            return 1

        def get_task(self, split, index):
            return Task("t", split, "x=")

        async def reset(self, task):
            return task.prompt

        async def step(self, completion):
            return StepResult(reward=float(completion == "raw <tool_call>"), done=True)

    env = Old()
    await env.reset(env.get_task("train", 0))
    r = await env.respond(Turn(text="raw <tool_call>", content="raw", index=0))
    assert r.reward == 1.0  # the verbatim text, not the tool-call-stripped content
    cf = CopyFirstEnv()
    t = cf.get_task("train", 0)
    await cf.reset(t)
    assert (await cf.respond(Turn(text=t.answer * 4, content=""))).reward == 1.0


def test_entry_points_are_read_once_per_sys_path(plugin, monkeypatch):
    """A rollout server resolves its env per order and per episode on its event loop: the
    metadata scan (every installed distribution) must not run each time."""
    import importlib.metadata

    calls = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or real(**kw)
    )
    monkeypatch.syspath_prepend(str(plugin / "elsewhere"))  # a sys.path not scanned yet
    for _ in range(5):
        assert resolve_env("plug").name == "plug"
    assert len(calls) == 1
    monkeypatch.syspath_prepend(str(plugin / "another"))  # new path: new packages may be on it
    assert resolve_env("plug").name == "plug" and len(calls) == 2


def test_the_readme_package_recipe_points_at_the_example_env():
    """examples/env_package/pyproject.toml (the README's "From one file to a package") makes
    examples/custom_env.py, copied as last_letter_env.py, the entry point `last_letter`;
    tests/integration/test_custom_env.py installs and trains it."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "examples/env_package/pyproject.toml").read_text())
    target = project["project"]["entry-points"]["climbrl.envs"]["last_letter"]
    module, _, cls = target.partition(":")
    assert project["tool"]["setuptools"]["py-modules"] == [module] == ["last_letter_env"]
    assert resolve_env(f"{root / 'examples/custom_env.py'}:{cls}").name == "last_letter"
    readme = (root / "README.md").read_text()
    assert f'last_letter = "{target}"' in readme
    assert "cp examples/custom_env.py last_letter/last_letter_env.py" in readme
