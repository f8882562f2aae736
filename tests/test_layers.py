"""The layers import downwards only: host -> sim -> hw -> compiler -> boards -> core.

Every ``import`` in every module of the package is checked, the ones inside
functions too (a lazy import is still a dependency). No exceptions are listed.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ["core", "boards", "compiler", "hw", "sim", "host"]     # bottom first
RANK = {name: i for i, name in enumerate(LAYERS)}


def _imports(path: pathlib.Path, root: pathlib.Path = ROOT):
    """``(line, imported llmfab module)`` for every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    parts = ["llmfab", *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    here = parts if path.name == "__init__.py" else parts[:-1]      # the module's package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for a in node.names:                  # `from llmfab import sim` names a layer too
                if mod == "llmfab":
                    yield node.lineno, f"llmfab.{a.name}"


def _layer(module: str):
    p = module.split(".")
    return p[1] if len(p) > 1 and p[0] == "llmfab" and p[1] in RANK else None


def test_every_import_points_down():
    bad = []
    seen = 0
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, mod in _imports(path):
                target = _layer(mod)
                if target is None:
                    continue
                seen += 1
                if RANK[target] > RANK[layer]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {mod} ({target})")
    assert seen > 100, seen                       # the walk found the package's imports
    assert bad == [], "imports against host -> sim -> hw -> compiler -> boards -> core:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    # the walker resolves relative and lazy imports: a hw module importing sim lazily is caught
    src = "def f():\n    from ..sim import golden\n    import llmfab.host.cli\n"
    (tmp_path / "hw").mkdir()
    p = tmp_path / "hw" / "probe.py"
    p.write_text(src)
    found = list(_imports(p, tmp_path))
    assert found == [(2, "llmfab.sim"), (3, "llmfab.host.cli")]
    assert [_layer(m) for _, m in found] == ["sim", "host"]
