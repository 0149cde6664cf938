"""Module structure: no import cycles between the bundle's modules, and one home for the dipole operator."""

import ast

from conftest import BUNDLE

SCRIPTS = BUNDLE / "scripts"


def module_name(path):
    rel = path.relative_to(BUNDLE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path):
    """Every ``scripts.*`` module that ``path`` imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("scripts"):
                found.add(target)
                for alias in node.names:  # ``from . import x`` / ``from .pkg import module``
                    if (SCRIPTS.parent / (target.replace(".", "/") + f"/{alias.name}.py")).exists():
                        found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("scripts")}
    return found - {name}


def test_no_module_imports_one_that_imports_it_back():
    modules = {module_name(p): p for p in SCRIPTS.rglob("*.py")}
    graph = {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    # a package's __init__ importing its own submodules is not a cycle; everything else is
    cycles = [
        (a, b)
        for a in graph
        for b in graph[a]
        if not b.startswith(a + ".") and not a.startswith(b + ".") and reaches(b, a, set())
    ]
    assert not cycles, cycles


def test_one_dipole_operator():
    """The kernel and the FFTs of the dipole convolution live in scripts/physics.py only."""
    for path in SCRIPTS.rglob("*.py"):
        if path.name == "physics.py":
            continue
        text = path.read_text()
        for needle in ("dipole_kernel(", "fftn(", "fftfreq("):
            assert needle not in text, f"{path.relative_to(BUNDLE)} computes {needle} itself"
