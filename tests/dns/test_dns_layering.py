"""The shared DNS layer sits at the bottom: it imports no protocol above it, and the clients
(the host daemon, the LLQ client) import it instead of the registry's server modules."""

from __future__ import annotations

import ast
from pathlib import Path

import btmm_core

ROOT = Path(btmm_core.__file__).parent


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("btmm_core")}


def test_the_dns_layer_imports_only_itself_and_the_errors() -> None:
    for path in sorted((ROOT / "dns").glob("*.py")):
        above = {m for m in _imports(path)
                 if not m.startswith(("btmm_core.dns", "btmm_core.errors"))}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_clients_do_not_import_the_registry() -> None:
    clients = [*sorted((ROOT / "daemon").glob("*.py")),
               *(ROOT / "llq" / name for name in ("client.py", "driver.py", "cli.py"))]
    for path in clients:
        server = {m for m in _imports(path) if m.startswith("btmm_core.registry")}
        assert not server, f"{path.relative_to(ROOT)} imports {sorted(server)}"
