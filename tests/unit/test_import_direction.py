"""The direction of imports between packages.

- rollout never imports the learner (what both sides share, like the routing codec, lives with
  the wire types in ``climbrl/``);
- the launchers never import the learner (the commands they start are ``climbrl.commands``);
- the test-model helper (``climbrl/tinymodel.py``) pulls in neither the environments nor
  pretraining, at any depth;
- the modules of pretraining import one another one way: no cycle.

Lazy imports inside functions count too: they run as soon as the code path does.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# climbrl.<name> -> its folder (pyproject's package-dir); the rest of climbrl.* is climbrl/
PACKAGES = {"rollout", "learner", "serving", "envs", "kernels", "pretrain"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from climbrl.pkg import mod` imports the module climbrl.pkg.mod
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _file(module: str) -> Path | None:
    """The source file of a ``climbrl.*`` module in this repository, if it is one."""
    parts = module.split(".")
    if parts[0] != "climbrl":
        return None
    base = ROOT / parts[1] if len(parts) > 1 and parts[1] in PACKAGES else ROOT / "climbrl"
    rest = parts[2:] if len(parts) > 1 and parts[1] in PACKAGES else parts[1:]
    for cand in (base.joinpath(*rest).with_suffix(".py"), base.joinpath(*rest) / "__init__.py"):
        if rest and cand.is_file():
            return cand
    return base / "__init__.py" if not rest and (base / "__init__.py").is_file() else None


def _closure(module: str) -> set[str]:
    """``module`` and every climbrl module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        f = _file(m)
        if m in seen or f is None:
            continue
        seen.add(m)
        todo += [i for i in _imports(f) if i.startswith("climbrl.")]
    return seen


def _in(pkg: str, module: str) -> bool:
    return module == pkg or module.startswith(pkg + ".")


def test_rollout_does_not_import_the_learner():
    bad = {
        f"{p.relative_to(ROOT)}: {m}"
        for p in sorted((ROOT / "rollout").glob("*.py"))
        for m in _imports(p)
        if _in("climbrl.learner", m)
    }
    assert not bad, f"rollout imports the learner: {sorted(bad)}"


def test_the_launchers_do_not_import_the_learner():
    for launcher in ("climbrl.launcher", "climbrl.launcher_ray"):
        bad = sorted(m for m in _closure(launcher) if _in("climbrl.learner", m))
        assert not bad, f"{launcher} imports the learner: {bad}"


def test_the_test_model_helper_pulls_in_neither_envs_nor_pretrain():
    reached = _closure("climbrl.tinymodel")
    assert "climbrl.tokenizer" in reached  # the walk follows its imports
    bad = sorted(m for m in reached if _in("climbrl.envs", m) or _in("climbrl.pretrain", m))
    assert not bad, f"climbrl.tinymodel pulls in {bad}"


def test_pretrain_has_no_import_cycle():
    mods = {f"climbrl.pretrain.{p.stem}": p for p in (ROOT / "pretrain").glob("*.py")}
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError(
                "pretrain import cycle: " + " -> ".join(path[path.index(m) :] + [m])
            )
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_the_closure_walk_sees_lazy_imports(tmp_path):
    """The walk above is what the other checks rest on: a lazy import inside a function is an
    import, and `from pkg import mod` reaches the module."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from climbrl.learner import fsdp\n")
    assert {"climbrl.learner", "climbrl.learner.fsdp"} <= _imports(f)
    assert _file("climbrl.learner.fsdp") == ROOT / "learner" / "fsdp.py"
    assert _file("climbrl.launcher") == ROOT / "climbrl" / "launcher.py"


def test_the_weights_package_does_not_import_the_learner():
    """``climbrl/weights`` serves both ends (the rollout side's worker extension imports it):
    like rollout, it reaches nothing of the learner, at any depth."""
    mods = ["climbrl.rollout.worker_ext", "climbrl.rollout.weight_receiver"] + [
        f"climbrl.weights.{p.stem}" for p in sorted((ROOT / "climbrl" / "weights").glob("*.py"))
    ]
    assert "climbrl.weights.vllm_cpu" in _closure("climbrl.rollout.worker_ext")
    for mod in mods:
        bad = sorted(m for m in _closure(mod) if _in("climbrl.learner", m))
        assert not bad, f"{mod} imports the learner: {bad}"
