"""Import rules of docs/architecture.md, checked by walking the AST of every module.

Every ``import`` and ``from ... import`` counts, at module level or inside a function: a lazy
import is still a dependency. ``btmm_core/cli.py`` names its commands' modules as strings for
``importlib``; it is the one place that may reach the lab and the benchmarks, and it does so only
when the command runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "btmm_core"

# Rank of each top-level part of btmm_core: a module may import its own part or a lower rank.
RANKS: dict[str, int] = {
    "errors": 0,
    "_fast": 0,
    "aio": 0,
    "log": 1,
    "metrics": 1,
    "dns": 1,
    "stun": 1,
    "sso": 1,
    "dataplane": 2,
    "keyex": 3,
    "portmap": 3,
    "turn": 3,
    "registry": 3,
    "llq": 4,
    "push": 4,
    "reach": 4,
    "names": 4,
    "daemon": 5,
    "watch": 5,
    "serve": 5,
    "lab": 6,
    "cli": 7,
    "__main__": 8,
}

# Modules that talk to a registry as clients: they must not lean on server code.
CLIENT_MODULES = (
    "btmm_core.daemon",
    "btmm_core.llq.client",
    "btmm_core.llq.driver",
    "btmm_core.watch",
    "btmm_core.push.client",
    "btmm_core.push.driver",
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from btmm_core import dns` imports the part `dns`, not just the package.
            if target == "btmm_core":
                found.extend(
                    (node.lineno, f"btmm_core.{alias.name}")
                    for alias in node.names
                    if (root / "btmm_core" / alias.name).is_dir()
                    or (root / "btmm_core" / f"{alias.name}.py").is_file()
                )
    return found


def part_of(module: str) -> str | None:
    pieces = module.split(".")
    if pieces[0] != "btmm_core" or len(pieces) < 2:
        return None
    return pieces[1]


def violations(path: Path, root: Path = ROOT) -> list[str]:
    name = module_name(path, root)
    own = part_of(name)
    problems: list[str] = []
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {n.lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)}
    for line, target in imports_of(path, root):
        where = f"{path.relative_to(root)}:{line} imports {target}"
        if target == "bench" or target.startswith("bench."):
            # `btmm bench` is the one door: inside its command function, never at import time.
            if name != "btmm_core.cli" or line in top_level:
                problems.append(f"{where}: benchmark code is never imported by btmm_core")
            continue
        if target == "fuzz" or target.startswith("fuzz."):
            problems.append(f"{where}: the fuzz targets are a developer tool, never imported")
            continue
        other = part_of(target)
        if other is None or own is None or other == own:
            continue
        if other not in RANKS or own not in RANKS:
            problems.append(f"{where}: part {other if other not in RANKS else own!r} has no rank")
        elif RANKS[other] >= RANKS[own]:
            problems.append(
                f"{where}: {own} (rank {RANKS[own]}) may not import {other} (rank {RANKS[other]})"
            )
        if other in ("registry", "serve") and name.startswith(CLIENT_MODULES):
            problems.append(f"{where}: a registry client never imports server code")
    return problems


def runtime_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts[:1])


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_only_downwards(path: Path) -> None:
    assert violations(path) == []


def test_every_part_has_a_rank() -> None:
    parts = {
        p.name.removesuffix(".py") for p in PACKAGE.glob("*") if p.is_dir() or p.suffix == ".py"
    }
    parts -= {"__init__", "__pycache__"}
    assert parts - set(RANKS) == set()


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    # The rules above must be able to fail: plant modules that break each one.
    cases = {
        "btmm_core/registry/bad.py": "from btmm_core.llq import server\n",
        "btmm_core/daemon/bad.py": "def f():\n    from btmm_core.registry import zones\n",
        "btmm_core/llq/client.py": "from ..registry.handler import RegistryCore\n",
        "btmm_core/dns/bad.py": "import btmm_core.keyex.noise\n",
        "btmm_core/keyex/bad.py": "import bench.codec\n",
        "btmm_core/portmap/bad.py": "from btmm_core import lab\n",
        "btmm_core/cli.py": "import bench.codec\n",
    }
    (tmp_path / "btmm_core/lab").mkdir(parents=True)
    for rel, text in cases.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        assert violations(path, tmp_path), f"{rel} should break a rule"
    fine = tmp_path / "btmm_core/daemon/fine.py"
    fine.write_text("from btmm_core.dns import tsig\nfrom . import records\n")
    assert violations(fine, tmp_path) == []
