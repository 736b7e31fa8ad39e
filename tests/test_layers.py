"""The import graph of `peftu/` keeps its rooms: no cycles, imports point down, the bottom stays light.

The graph is read with `ast` from the source, so nothing is imported to check it. Every
`import` and `from ... import` counts, at module level and inside functions alike: a
function-level import still ties the two modules together, it only moves the cost to the
first call; one under `if TYPE_CHECKING:` still names a dependency. A package's `__init__`
is a module like the others, in the room the table gives it; as every import of one of its
modules runs it, it must not import above that room. The checker runs on the real tree and on a small fake package with a back-import and a
cycle, so a broken rule is seen to fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import peftu

# The layer table, bottom first (docs/design.md quotes it). A module may import its own room and
# the rooms of lower layers. Rooms in one layer are siblings and never import each other. A room
# holds the modules named and everything below them; the longest name that fits a module wins.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"foundation": ("peftu.errors", "peftu.paths", "peftu.logs", "peftu.config")},
    {"data": ("peftu.data", "peftu.store")},
    {"model": ("peftu.model", "peftu.bank")},
    {"inference": ("peftu.inference", "peftu.evaluation", "peftu.pplug", "peftu.neighbors")},
    {"training": ("peftu.fitting", "peftu.tuning", "peftu.quality", "peftu.pplug.train"),
     "serving": ("peftu.serving",)},
    {"bench": ("peftu.bench",)},
    {"cli": ("peftu.cli", "peftu.__main__")},
]
ROOT, ROOT_ROOM = "peftu", "foundation"
"""The room of the top package itself (`peftu/__init__.py`), which every import of `peftu.*` runs."""

FORBIDDEN = {"peftu.serving": ("peftu.model.build",)}
"""Below-room imports a room still must not make: a replica never trains, nor builds a base."""

HEAVY = ("torch", "transformers", "peft", "ray")
LIGHT_EVERYWHERE = ("peftu.store", "peftu.data.schema", "peftu.config")
"""Modules that import none of HEAVY, not even inside a function: a store client or a settings
model must not need the ML stack."""
FOUNDATION_LIGHT_AT_IMPORT = (*HEAVY, "datasets")
"""What foundation modules must not import at module level (so `peftu --help` starts fast)."""


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `source` imports `target` (a peftu module or a top-level library)."""

    source: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    """`root/peftu/store/ids.py` -> "peftu.store.ids"; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_graph(package_dir: Path) -> tuple[set[str], list[Import]]:
    """Every module of the package at `package_dir` and every import they make."""
    root = package_dir.parent
    files = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(files)
    imports: list[Import] = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        imports += _imports_of(name, is_package, ast.parse(path.read_text(), str(path)), modules)
    return modules, imports


def _imports_of(name: str, is_package: bool, tree: ast.Module, modules: set[str]) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, _known(a.name, modules), child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, name, is_package)
                for alias in child.names:
                    # `from a.b import c` imports the module a.b.c when there is one, else a name of a.b.
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in modules else _known(base, modules)
                    found.append(Import(name, target, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from` import names, with a relative one (`from .x import y`) resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _known(name: str, modules: set[str]) -> str:
    """A peftu module as named; a library by its top-level name ("torch.nn" -> "torch")."""
    return name if name in modules else name.split(".")[0]


# ---------------------------------------------------------------- the rules


def room_of(module: str) -> str | None:
    """The room holding `module`, None if the table places it nowhere."""
    if module == ROOT:
        return ROOT_ROOM
    best: tuple[int, str] | None = None
    for layer in LAYERS:
        for room, names in layer.items():
            for entry in names:
                if _within(module, (entry,)) and (best is None or len(entry) > best[0]):
                    best = (len(entry), room)
    return best[1] if best else None


def layer_of(room: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if room in layer)


def _within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(f"{n}.") for n in names)


def layering_violations(modules: set[str], imports: list[Import]) -> list[str]:
    """Imports that point up or sideways, forbidden ones, and modules the table places nowhere."""
    out = [f"{m} is in no room: add it to LAYERS in tests/test_layers.py" for m in sorted(modules)
           if room_of(m) is None]
    for imp in imports:
        here = room_of(imp.source)
        if imp.target not in modules or here is None:
            continue
        where = f"{imp.source}:{imp.line} ({here}{', in a function' if imp.in_function else ''})"
        for forbidden_in, targets in FORBIDDEN.items():
            if _within(imp.source, (forbidden_in,)) and _within(imp.target, targets):
                out.append(f"{where} imports {imp.target}, which {forbidden_in} must never import")
        there = room_of(imp.target)
        if there is not None and there != here and layer_of(there) >= layer_of(here):
            side = "a sibling" if layer_of(there) == layer_of(here) else "a higher"
            out.append(f"{where} imports {imp.target}: {there} is {side} room")
    return out


def _edges(modules: set[str], imports: list[Import]) -> dict[str, set[str]]:
    """Which peftu modules each module imports."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    return edges


def _shortest_paths(starts: set[str], edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each module reachable from `starts` (them included), with a shortest import chain to it."""
    paths = {m: [m] for m in sorted(starts)}
    frontier = list(paths)
    while frontier:
        reached = []
        for v in frontier:
            for w in sorted(edges[v] - paths.keys()):
                paths[w] = [*paths[v], w]
                reached.append(w)
        frontier = reached
    return paths


def heavy_violations(modules: set[str], imports: list[Import]) -> list[str]:
    """The ML stack imported by a light module or by a peftu module a light one imports (at any
    level: the light module needs it too), or by foundation at module level."""
    chains = _shortest_paths({m for m in modules if _within(m, LIGHT_EVERYWHERE)}, _edges(modules, imports))
    out = []
    for imp in imports:
        where = f"{imp.source}:{imp.line}"
        if imp.source in chains and imp.target in HEAVY:
            chain = chains[imp.source]
            via = f" (imported by {' -> '.join(chain)})" if len(chain) > 1 else ""
            out.append(f"{where} imports {imp.target}{via}; {chain[0]} must not need it, not even inside a function")
        elif (room_of(imp.source) == "foundation" and not imp.in_function
              and imp.target in FOUNDATION_LIGHT_AT_IMPORT):
            out.append(f"{where} imports {imp.target} at module level; foundation imports it inside functions only")
    return out


def cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] through each group of modules that import each other,
    directly or through others."""
    edges = _edges(modules, imports)
    back = {m: _shortest_paths(edges[m], edges) for m in sorted(modules)}  # what m's imports reach
    found, seen = [], set()
    for m, reach in back.items():
        if m in reach and m not in seen:
            found.append([m, *reach[m]])
            seen |= {w for w in reach if m in back[w]}  # m's group: the modules m reaches and back
    return found


def problems(package_dir: Path) -> list[str]:
    """Everything wrong with the package at `package_dir`, one line each."""
    modules, imports = read_graph(package_dir)
    found = [f"import cycle: {' -> '.join(c)}" for c in cycles(modules, imports)]
    found += layering_violations(modules, imports) + heavy_violations(modules, imports)
    return list(dict.fromkeys(found))  # one line for an import of several names


# ---------------------------------------------------------------- the tests


def test_peftu_keeps_its_layers():
    found = problems(Path(peftu.__file__).parent)
    assert found == [], "\n".join(found)


def test_every_table_entry_names_a_module():
    """A renamed module leaves no stale line in the table (which would place nothing)."""
    modules, _ = read_graph(Path(peftu.__file__).parent)
    stale = [e for layer in LAYERS for names in layer.values() for e in names
             if not any(m == e or m.startswith(f"{e}.") for m in modules)]
    assert stale == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "peftu" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "peftu"


def test_the_checker_reports_a_back_import_a_cycle_and_heavy_imports(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "import torch\n",  # foundation, module level
        "config.py": "def f():\n    import ray\n",  # light even inside a function
        "store/__init__.py": "",
        "store/x.py": "def f():\n    from peftu.serving.y import g\n",  # a back-import, in a function
        "serving/__init__.py": "",
        "serving/y.py": "from peftu.store import x\nfrom peftu.model import build\nfrom peftu.fitting import job\n",
        "model/__init__.py": "",
        "model/build.py": "",
        "fitting/__init__.py": "",
        "fitting/job.py": "from . import loop\n",  # relative: peftu.fitting.loop
        "fitting/loop.py": "import peftu.fitting.job\n",
        "pplug/__init__.py": "from peftu.pplug.train import fit\n",  # runs on every import of pplug.*
        "pplug/encoder.py": "",
        "pplug/train.py": "from peftu.pplug.encoder import E\n",
        "data/__init__.py": "",
        "data/schema.py": "from peftu.data import tools\n",
        "data/tools.py": "def f():\n    import transformers.models\n",  # light, as schema needs it
        "stray.py": "",
    })
    found = problems(package)
    assert "import cycle: peftu.serving.y -> peftu.store.x -> peftu.serving.y" in found
    assert "import cycle: peftu.fitting.job -> peftu.fitting.loop -> peftu.fitting.job" in found
    assert "peftu.store.x:2 (data, in a function) imports peftu.serving.y: serving is a higher room" in found
    assert "peftu.serving.y:3 (serving) imports peftu.fitting.job: training is a sibling room" in found
    assert "peftu.serving.y:2 (serving) imports peftu.model.build, which peftu.serving must never import" in found
    assert "peftu.pplug:1 (inference) imports peftu.pplug.train: training is a higher room" in found
    assert "peftu.stray is in no room: add it to LAYERS in tests/test_layers.py" in found
    assert "peftu.errors:1 imports torch at module level; foundation imports it inside functions only" in found
    assert "peftu.config:2 imports ray; peftu.config must not need it, not even inside a function" in found
    assert ("peftu.data.tools:2 imports transformers (imported by peftu.data.schema -> peftu.data.tools); "
            "peftu.data.schema must not need it, not even inside a function") in found
    # and nothing else: pplug.train may import pplug.encoder, the room below
    assert len(found) == 10, "\n".join(found)
