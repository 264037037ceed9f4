"""The design's import directions, checked on the source and by importing with torch unavailable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(pkg: str) -> list[tuple[Path, str]]:
    out = []
    for f in (ROOT / pkg).rglob("*.py"):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(f, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((f, node.module))
    return out


def _offenders(pkg: str, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{f.relative_to(ROOT)}: {m}" for f, m in _imports(pkg) if m.split(".")[0] in banned or m.startswith(banned)
    ]


def test_agent_never_imports_torch_build_or_server() -> None:
    found = _offenders("agent", ("torch", "edgellm.pipeline", "server"))
    # agent/federated (the `federated` extra) alone may use torch and the pipeline
    assert [o for o in found if not o.startswith("agent/federated/") or o.endswith(": server")] == []


def test_server_never_imports_agent() -> None:
    assert _offenders("server", ("agent",)) == []


def test_sdk_imports_neither_agent_nor_server() -> None:
    assert _offenders("edgellm", ("agent", "server")) == []


def test_agent_and_sdk_import_with_torch_unavailable() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import importlib, pkgutil\n"
        "import agent, edgellm, edgellm.bundle, edgellm.trust, edgellm.profiles, edgellm.runtime, edgellm.cli\n"
        "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
        "    if '.federated' not in m.name: importlib.import_module(m.name)\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def _statement_lines(node: ast.AST) -> int:
    """Lines on which a statement starts: the size of code as written, whatever layout the formatter
    gives a long call (one argument per line) or a long literal."""
    return len({n.lineno for n in ast.walk(node) if isinstance(n, ast.stmt)})


def test_modules_and_functions_stay_small() -> None:
    """Modules under ~450 lines and functions under ~80, so each piece can be read in one go.

    Counted in statement lines (about 350 and 65: what 450 and 80 lines of this code held before
    `ruff format` spread long calls over one line per argument)."""
    too_big = []
    for package in ("edgellm", "agent", "server"):
        for f in (ROOT / package).rglob("*.py"):
            tree = ast.parse(f.read_text())
            if (n := _statement_lines(tree)) > 350:
                too_big.append(f"{f.relative_to(ROOT)}: {n} statement lines")
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _statement_lines(node) > 65:
                    too_big.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}(): {_statement_lines(node)}")
    assert too_big == []
