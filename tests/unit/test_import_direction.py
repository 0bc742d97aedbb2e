"""The direction of imports between packages: rollout never imports the learner (what both
sides share, like the routing codec, lives with the wire types in ``climbrl/``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_rollout_does_not_import_the_learner():
    bad = {
        f"{p.relative_to(ROOT)}: {m}"
        for p in sorted((ROOT / "rollout").glob("*.py"))
        for m in _imports(p)
        if m == "climbrl.learner" or m.startswith("climbrl.learner.")
    }
    assert not bad, f"rollout imports the learner: {sorted(bad)}"
