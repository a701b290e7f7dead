"""The layout's promises, checked on the source: what each package may import, how long a
function may be, and that every package says what it holds.

Imports are followed transitively through dpfl's own modules, and imports inside functions
count too (a lazy ``import torch`` still needs torch on the device).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dpfl.shared": ROOT / "shared", "dpfl.client": ROOT / "client",
            "dpfl.server": ROOT / "server"}

#: package -> third-party top-level modules it must never reach, directly or through dpfl.
FORBIDDEN = {
    "dpfl.shared": {"flwr"},
    "dpfl.shared.edge": {"torch", "diffusers", "peft", "opacus", "flwr"},
    "dpfl.shared.federation": {"flwr", "torch", "opacus"},
    "dpfl.shared.privacy": {"flwr"},
    "dpfl.shared.deploy": {"flwr", "torch"},
    "dpfl.shared.data": {"flwr", "opacus"},
    "dpfl.shared.ldm": {"flwr", "opacus"},
    "dpfl.shared.report": {"flwr"},
}
MAX_FUNCTION_LINES = 50


def module_file(name: str) -> Path | None:
    for pkg, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if name == pkg or name.startswith(pkg + "."):
            rel = name[len(pkg):].lstrip(".").replace(".", "/")
            base = folder / rel if rel else folder
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py")
            if (base / "__init__.py").is_file():
                return base / "__init__.py"
    return None


def all_modules() -> list[str]:
    names = []
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([pkg, *parts]))
    return sorted(names)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = module_file(module).name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Every module named by an import statement anywhere in ``module``'s source."""
    path = module_file(module)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            found.add(target)
            # ``from pkg import mod`` imports a module when ``pkg.mod`` is one of ours
            found.update(f"{target}.{a.name}" for a in node.names
                         if module_file(f"{target}.{a.name}") is not None)
    parts = module.split(".")
    found.update(".".join(parts[:i]) for i in range(2, len(parts)))  # parent packages run
    return frozenset(found)


def reached(module: str) -> dict[str, list[str]]:
    """Third-party top-level module -> one import chain from ``module`` that reaches it."""
    chains: dict[str, list[str]] = {}
    seen, todo = {module}, [[module]]
    while todo:
        chain = todo.pop()
        for name in direct_imports(chain[-1]):
            if name.startswith("dpfl."):
                if module_file(name) is not None and name not in seen:
                    seen.add(name)
                    todo.append(chain + [name])
            else:
                chains.setdefault(name.split(".")[0], chain + [name])
    return chains


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_reaches_forbidden_imports(package):
    members = [m for m in all_modules() if m == package or m.startswith(package + ".")]
    assert members, f"no modules found for {package}"
    bad = {}
    for m in members:
        for lib, chain in reached(m).items():
            if lib in FORBIDDEN[package]:
                bad[f"{m} -> {lib}"] = " -> ".join(chain)
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}:\n" + \
        "\n".join(f"  {v}" for v in bad.values())


def test_import_rule_check_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself: a torch import planted in an edge module is found."""
    fake = tmp_path / "shared"
    (fake / "edge").mkdir(parents=True)
    (fake / "__init__.py").write_text('"""x"""\n')
    (fake / "edge" / "__init__.py").write_text('"""x"""\n')
    (fake / "edge" / "a.py").write_text("from dpfl.shared.edge import b\n")
    (fake / "edge" / "b.py").write_text("def f():\n    import torch.nn\n")
    monkeypatch.setitem(PACKAGES, "dpfl.shared", fake)
    direct_imports.cache_clear()
    try:
        assert reached("dpfl.shared.edge.a")["torch"][-1] == "torch.nn"
    finally:
        direct_imports.cache_clear()


def test_edge_sampler_imports_without_torch_installed():
    """Run-time check beside the static one: torch, diffusers and flwr blocked."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in {'torch', 'diffusers', 'peft', 'flwr'}:\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import dpfl.shared.edge.cli, dpfl.shared.edge.sampler, dpfl.shared.edge.grid\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_function_is_longer_than_the_limit():
    long = []
    for folder in PACKAGES.values():
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)


def test_every_package_says_what_it_holds_and_may_not_import():
    for folder in PACKAGES.values():
        for init in sorted(folder.rglob("__init__.py")):
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert len(doc) > 40, f"{init.relative_to(ROOT)} needs a docstring"
            if init.parent.parent.name == "shared":
                assert "never" in doc.lower(), \
                    f"{init.relative_to(ROOT)}: say what the package must not import"
