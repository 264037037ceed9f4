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


def test_agent_modules_and_functions_stay_small() -> None:
    """Modules under ~450 lines and functions under ~80, so each piece can be read in one go."""
    too_big = []
    for f in (ROOT / "agent").rglob("*.py"):
        if "federated" in f.parts:
            continue
        text = f.read_text()
        if text.count("\n") > 460:
            too_big.append(f"{f.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    too_big.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}(): {n} lines")
    assert too_big == []
