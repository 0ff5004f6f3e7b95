"""The import arrows of the house point one way: wiring → HTTP edge → domain → infrastructure → crypto.

README's "How it is built" draws the map; this test keeps it true. Each rule names the modules it
governs and what they must not import; a failure lists every offending import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRASTRUCTURE = ("app.db", "app.stores", "app.security", "app.observability")
EDGE_MODULES = ("controllers", "schemas")  # each domain's HTTP edge: handlers and wire bodies


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for package in ("app", "crypto"):
        for path in (ROOT / package).rglob("*.py"):
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
            found[_module(path)] = names
    return found


IMPORTS = _imports()


def _within(name: str, *prefixes: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _is_edge(module: str) -> bool:
    return module.startswith("app.domain.") and module.rsplit(".", 1)[-1] in EDGE_MODULES


def _offences(governed: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module in governed
        for name in IMPORTS[module]
        if _within(name, *forbidden) and not _within(name, module)
    )


RULES = {
    "crypto is framework-free and knows nothing of the service": (
        [m for m in IMPORTS if _within(m, "crypto")],
        ("app", "litestar", "sqlalchemy", "redis"),
    ),
    "settings are a leaf": (
        ["app.settings"],
        ("app.db", "app.stores", "app.security", "app.domain", "app.http", "app.server"),
    ),
    "infrastructure knows no domain, edge or wiring": (
        [m for m in IMPORTS if _within(m, *INFRASTRUCTURE)],
        ("app.domain", "app.http", "app.server"),
    ),
    "domain services are framework-free and raise domain errors": (
        [m for m in IMPORTS if _within(m, "app.domain") and not _is_edge(m)],
        ("app.http", "app.server", "litestar"),
    ),
    "controllers and schemas do not reach into the wiring": (
        [m for m in IMPORTS if _is_edge(m)],
        ("app.server",),
    ),
    "the HTTP edge knows no wiring and no controller": (
        [m for m in IMPORTS if _within(m, "app.http")],
        ("app.server", *(m for m in IMPORTS if _is_edge(m) and m.endswith(".controllers"))),
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_arrows_point_down(rule: str) -> None:
    governed, forbidden = RULES[rule]
    assert governed, f"{rule}: the rule governs no module (a package moved?)"
    assert _offences(governed, forbidden) == []


def test_only_the_entry_point_imports_the_wiring() -> None:
    importers = sorted(
        module
        for module, names in IMPORTS.items()
        if not _within(module, "app.server", "app.asgi") and any(_within(name, "app.server") for name in names)
    )
    assert importers == []


def test_the_domain_does_not_build_http_problems() -> None:
    """Problem details are made in one place (app.http.problems) from the domain's errors."""
    builders = sorted(
        module
        for module, names in IMPORTS.items()
        if _within(module, "app.domain") and "litestar.plugins.problem_details" in names
    )
    assert builders == []
