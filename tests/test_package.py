"""The package's shape: imports point one way, no cycles, no function-level imports, no private names shared."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "hf_compress"
# heavy optional dependencies that may be imported inside a function (so the base install works without them)
OPTIONAL = {"onnx", "onnxruntime", "sentence_transformers", "tensorboard", "gguf", "deepspeed"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, name: str) -> list[tuple[ast.ImportFrom | ast.Import, str, bool]]:
    """(node, absolute module, inside a function) for every import of ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                found.append((child, module, in_function))
            elif isinstance(child, ast.Import):
                found.extend((child, alias.name, in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def _edges() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node, module, _ in _imports(path, name):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [""]
            for alias in names:
                target = f"{module}.{alias}" if f"{module}.{alias}" in mods else module
                if target in mods and target != name and not name.startswith(target + "."):
                    if not (path.name == "__init__.py" and target.startswith(name + ".")):
                        edges[name].add(target)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def dfs(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if not state.get(nxt) and (found := dfs(nxt, stack)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if not state.get(node) and (found := dfs(node, [])):
            return found
    return None


def _concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hf_compress"


def test_no_import_cycle_between_modules():
    assert _cycle(_edges()) is None, " -> ".join(_cycle(_edges()) or [])


def test_no_import_cycle_between_concerns():
    concerns: dict[str, set[str]] = {}
    for module, targets in _edges().items():
        if module == "hf_compress":  # the package root re-exports the public API
            continue
        for target in targets:
            if _concern(target) != _concern(module):
                concerns.setdefault(_concern(module), set()).add(_concern(target))
    assert _cycle(concerns) is None, " -> ".join(_cycle(concerns) or [])
    assert not concerns.get("models", set()) - {"models"}, "models/ must not depend on the rest of the library"


def test_no_function_level_imports_except_optional_dependencies():
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
        for name, path in _modules().items()
        for node, module, in_function in _imports(path, name)
        if in_function and module.split(".")[0] not in OPTIONAL
    ]
    assert not offenders, "move these imports to the top of the module:\n" + "\n".join(offenders)


def test_no_private_names_imported_across_modules():
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {module}"
        for name, path in _modules().items()
        for node, module, _ in _imports(path, name)
        if isinstance(node, ast.ImportFrom) and module.startswith("hf_compress")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    test_files = [p for p in (ROOT / "tests").rglob("*.py")]
    for path in test_files:
        for node, module, _ in _imports(path, "tests.x"):
            if isinstance(node, ast.ImportFrom) and module.startswith("hf_compress"):
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name} from {module}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders, "make these public in the module that owns them:\n" + "\n".join(offenders)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The helpers above find a cycle and a function-level import when there is one."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    from json import dumps\n    return dumps\n")
    assert [(m, inside) for _, m, inside in _imports(path, "pkg.m")] == [("os", False), ("json", True)]
