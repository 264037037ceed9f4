"""pyproject.toml declares what the code imports, per extra."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: import name -> distribution name where they differ
DIST = {
    "yaml": "pyyaml",
    "llama_cpp": "llama-cpp-python",
    "paho": "paho-mqtt",
    "flwr": "flwr",
    "prometheus_client": "prometheus-client",
}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported outside functions and classes (what importing the module needs)."""
    names: set[str] = set()
    stack: list[ast.AST] = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        stack.extend(ast.iter_child_nodes(node))
    return {n for n in names if n not in sys.stdlib_module_names and n != "edgellm"}


def _declared(requirements: list[str]) -> dict[str, str]:
    """Distribution name -> its environment marker ('' when unconditional)."""
    out = {}
    for req in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        out[name] = req.partition(";")[2].strip()
    return out


def test_every_import_of_the_sdk_core_is_a_declared_dependency():
    declared = _declared(PROJECT["dependencies"])
    for path in sorted((ROOT / "edgellm").glob("*.py")):
        for name in _module_level_imports(path):
            assert DIST.get(name, name).lower() in declared, f"{path.name} imports {name}, not in dependencies"


def test_tomli_is_required_exactly_where_tomllib_is_missing():
    marker = _declared(PROJECT["dependencies"]).get("tomli")
    assert marker is not None, "edgellm.profiles imports tomli on Python 3.10"
    assert re.fullmatch(r"python_version\s*<\s*['\"]3\.11['\"]", marker), marker


def test_extras_put_flower_with_federated_and_keep_all_complete():
    extras = PROJECT["optional-dependencies"]
    names = {k: set(_declared(v)) for k, v in extras.items()}
    assert "flwr" in names["federated"] and "flwr" not in names["server"] and "flwr" not in names["agent"]
    assert "torch" not in names["agent"] and "torch" not in names["runtimes"]
    assert "torch" in names["pipeline"] and "edgellm[pipeline]" in extras["server"]
    assert {"fastapi", "uvicorn", "prometheus-client", "paho-mqtt"} <= names["server"]
    assert extras["all"] == ["edgellm[agent,server,federated,dev]"]
