"""The package's imports follow the data flow: no module imports a higher layer, no cycles.

The layer order is written once, in ``LAYERS``; every module of the package must be placed in
it (a new top-level module or package fails here until it is). Imports inside functions count
too: a lazy import is still a dependency. Each ``commands.py`` drives its folder from the command
line, so it sits on the CLI floor whatever folder it lives in.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import composed_retrieval

PKG = "composed_retrieval"
ROOT = Path(composed_retrieval.__file__).parent

#: lowest first; a module may import its own layer and any layer below it
LAYERS: list[tuple[str, ...]] = [
    ("errors", "fileio", "features", "gather"),     # ground floor: no package imports but these
    ("data", "synth"),                              # dataset files -> splits, images, pixels
    ("encoders",),                                  # image and text towers, weight files
    ("cache", "losses"),                            # features on disk; the shared losses
    ("methods",),                                   # compositors and their objectives
    ("evaluation",),                                # metrics, protocols, submissions
    ("train", "spn", "zeroshot", "config"),         # the loop, its config, the training recipes
    ("index",),                                     # gallery vectors and engines
    ("service",),                                   # HTTP + web page
    ("commands", "cli", "__main__", "__init__"),    # the command line drives everything
]


def _layer_of(module: str) -> int:
    parts = module.split(".")[1:]          # drop the package name
    if not parts:
        key = "__init__"
    elif parts[-1] == "commands":
        key = "commands"
    else:
        key = parts[0]
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"module {module} ({key!r}) is not placed in tests/test_layering.py LAYERS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] if len(parts) > 2 else parts
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG:
                continue
            # "from . import x" / "from .pkg import mod": the names may be submodules
            names = [f"{target}.{a.name}" for a in node.names]
            subs = [n for n in names if _is_module(n)]
            out += [(n, node.lineno) for n in subs] or [(target, node.lineno)]
    return out


def _is_module(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_is_placed_in_a_layer() -> None:
    for module in _graph():
        _layer_of(module)


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    bad = []
    for module, imports in _graph().items():
        here = _layer_of(module)
        for target, line in imports:
            if _layer_of(target) > here:
                bad.append(f"{module}:{line} imports {target} "
                           f"(layer {LAYERS[_layer_of(target)]} is above {LAYERS[here]})")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = {m: sorted({t for t, _ in imps if t != m}) for m, imps in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module, forbidden", [
    ("composed_retrieval.losses", "composed_retrieval.train"),
    ("composed_retrieval.methods.cala", "composed_retrieval.train"),
    ("composed_retrieval.methods.cala", "composed_retrieval.methods.dra"),
    ("composed_retrieval.evaluation.runner", "composed_retrieval.train"),
    ("composed_retrieval.data.triplets", "composed_retrieval.encoders"),
    ("composed_retrieval.data.nouns", "composed_retrieval.synth"),
    ("composed_retrieval.encoders.openclip", "composed_retrieval.encoders.registry"),
])
def test_the_five_reported_edges_are_gone(module: str, forbidden: str) -> None:
    graph = _graph()
    hits = [t for t, _ in graph[module] if t == forbidden or t.startswith(forbidden + ".")]
    assert not hits, f"{module} imports {hits}"


def test_backends_import_nothing_from_the_registry() -> None:
    graph = _graph()
    for module, imports in graph.items():
        if module.startswith(f"{PKG}.encoders.") and module != f"{PKG}.encoders.registry":
            assert f"{PKG}.encoders.registry" not in [t for t, _ in imports], module


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walker must resolve relative imports, or every test above passes vacuously."""
    graph = _graph()
    runner = graph[f"{PKG}.evaluation.runner"]
    assert f"{PKG}.cache" in [t for t, _ in runner]              # "from ..cache import FeatureTable"
    assert _layer_of(f"{PKG}.train.loop") > _layer_of(f"{PKG}.evaluation.runner")
    assert _layer_of(f"{PKG}.index.commands") == len(LAYERS) - 1
