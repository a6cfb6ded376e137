"""Architecture rules for the `softprompt_cli` package, checked statically with `ast`.

Why these rules exist:

* The package is layered so that each part can be read, tested and changed without the parts
  above it: `cli -> commands -> {serving, inference, training, assemble, artifacts} -> model -> methods`, with
  `config` and `data` as leaves that everything may use and that use nothing above them, and the
  top-level utilities (errors, metrics, memory, hub, peft_compat) as leaves below even those.
  Imports must point down the layers; an import that points up is a dependency the design
  says should not exist.
* Nothing but the CLI imports `commands`: a command is an entry point, not a library.
* Import cycles make import order matter, hide the real dependency direction, and break lazy
  imports; every import counts here, including ones inside functions and `if TYPE_CHECKING:`
  blocks, because a function-level import still couples the two modules.
* Functions longer than a screen (60 lines) are hard to review; split them.

The tests walk whatever layout `softprompt_cli/` has at the moment, so they keep working while
modules move into subpackages. A layer rule that names a subpackage that does not exist yet
simply matches nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "softprompt_cli"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
REPO = PACKAGE_DIR.parent
MAX_FUNCTION_LINES = 60

# (module prefix, rank): the first rule whose prefix matches a module gives its rank. A module may
# import only modules of a lower or equal rank, or modules in its own top-level subpackage.
LAYERS = [
    (f"{PACKAGE}.__main__", 8),
    (f"{PACKAGE}.cli", 7),
    (f"{PACKAGE}.commands", 6),
    # The HTTP server answers with what predict answers: loaded tasks and their batches (inference).
    (f"{PACKAGE}.serving", 5),
    (f"{PACKAGE}.inference", 5),
    (f"{PACKAGE}.training", 5),
    (f"{PACKAGE}.assemble", 5),
    (f"{PACKAGE}.artifacts", 4),
    (f"{PACKAGE}.model", 3),
    # The recipe schema holds the registered methods' options, so methods sit beside config and data.
    (f"{PACKAGE}.methods", 1),
    (f"{PACKAGE}.data", 1),
    (f"{PACKAGE}.config", 1),
    (PACKAGE, 0),  # top-level leaf utilities: errors, metrics, memory, hub, peft_compat
]
# Only these may import `softprompt_cli.commands*` (besides `commands` itself).
COMMANDS = f"{PACKAGE}.commands"
COMMANDS_IMPORTERS = (f"{PACKAGE}.cli", COMMANDS)


# ----------------------------------------------------------------------------- module discovery


def module_name(path: Path) -> str:
    """`softprompt_cli/a/b.py` -> `softprompt_cli.a.b`; `softprompt_cli/a/__init__.py` -> `softprompt_cli.a`."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    paths = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    return {module_name(path): path for path in paths}


def is_within(module: str, prefix: str) -> bool:
    """Whether `module` is `prefix` or lies below it (dot boundary: `data` does not match `dataset`)."""
    return module == prefix or module.startswith(prefix + ".")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ----------------------------------------------------------------------------- import graph


def nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a module of the package, else its longest dotted prefix that is one."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def from_import_base(node: ast.ImportFrom, importer: str, modules: dict[str, Path]) -> str:
    """The absolute module named by `from <base> import ...`, resolving relative imports."""
    if node.level == 0:
        return node.module or ""
    is_package = modules[importer].name == "__init__.py"
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def import_targets(node: ast.Import | ast.ImportFrom, importer: str, modules: dict[str, Path]) -> set[str]:
    """The package modules one import statement explicitly names (not their implicit parents)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = from_import_base(node, importer, modules)
        names = [base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names]
    targets = set()
    for name in names:
        if is_within(name, PACKAGE):
            target = nearest_module(name, modules)
            if target is not None:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, counting every import statement in the file."""
    modules = discover_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= import_targets(node, name, modules)
    return graph


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative so deep graphs cannot hit the recursion limit."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = lowlink[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_description(component: list[str], graph: dict[str, set[str]]) -> str:
    """One cycle's modules, with the edges among them so the fix is easy to find."""
    members = set(component)
    edges = [f"    {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "  cycle: " + ", ".join(component) + "\n" + "\n".join(edges)


# ----------------------------------------------------------------------------- layers


def rank(module: str) -> int:
    for prefix, layer_rank in LAYERS:
        if is_within(module, prefix):
            return layer_rank
    raise AssertionError(f"{module} matches no layer rule")


def top_level_subpackage(module: str, modules: dict[str, Path]) -> str | None:
    """`softprompt_cli.x` for a module inside (or equal to) the subpackage `softprompt_cli/x/`."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    top = ".".join(parts[:2])
    is_package = top in modules and modules[top].name == "__init__.py"
    return top if is_package else None


def layer_violation(importer: str, imported: str, modules: dict[str, Path]) -> str | None:
    """Why `importer -> imported` breaks the layering, or None when it is allowed."""
    if is_within(imported, COMMANDS) and not any(is_within(importer, p) for p in COMMANDS_IMPORTERS):
        return "only the cli imports commands"
    top = top_level_subpackage(importer, modules)
    if top is not None and top == top_level_subpackage(imported, modules):
        return None
    if rank(imported) > rank(importer):
        return f"rank {rank(importer)} imports rank {rank(imported)}"
    return None


# ----------------------------------------------------------------------------- function length


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append((node.lineno, f"{rel(path)}:{node.lineno} {node.name} ({lines} lines)"))
    return [message for _, message in sorted(found)]


# ----------------------------------------------------------------------------- tests


def test_package_is_found():
    """Guards the other tests against passing vacuously because the walk found nothing."""
    modules = discover_modules()
    assert f"{PACKAGE}.cli" in modules, f"no cli module under {PACKAGE_DIR}"


def test_no_import_cycles():
    graph = import_graph()
    cycles = [
        component
        for component in strongly_connected_components(graph)
        if len(component) > 1 or component[0] in graph[component[0]]
    ]
    report = "\n".join(cycle_description(component, graph) for component in cycles)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) in {PACKAGE}:\n{report}", pytrace=False)


def test_layers_point_down():
    modules = discover_modules()
    violations = []
    for importer, imported_modules in sorted(import_graph().items()):
        for imported in sorted(imported_modules):
            reason = layer_violation(importer, imported, modules)
            if reason is not None:
                violations.append(f"  {importer} -> {imported}  ({reason})")
    report = "\n".join(violations)
    if violations:
        pytest.fail(f"{len(violations)} import(s) point up the layers:\n{report}", pytrace=False)


def test_functions_fit_on_a_screen():
    too_long = [message for path in discover_modules().values() for message in long_functions(path)]
    report = "\n".join(f"  {message}" for message in too_long)
    if too_long:
        pytest.fail(f"{len(too_long)} function(s) over {MAX_FUNCTION_LINES} lines:\n{report}", pytrace=False)
