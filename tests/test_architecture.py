"""The package's import graph, read from the source with `ast`: no import cycle (imports inside functions
count: they are how a cycle hides) and no module, the CLI aside, that imports more than a third of the package."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_influence"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its body}."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                module = node.module if node.level == 0 else ".".join(filter(None, [base, node.module]))
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            imported |= {c for c in candidates if c in modules and c != name}
        graph[name] = imported
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reader_sees_cycles_and_function_level_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "hf_influence.engine" in graph["hf_influence.influence"]
    # the trainer imports PEFT-free code at the top and the hub module inside a function: that edge is seen too.
    assert "hf_influence.artifacts.hub" in graph["hf_influence.trainer"]


def test_no_import_cycle():
    graph = {name: edges for name, edges in import_graph().items()}
    # A package's __init__ re-exports its modules; the edge from a module up to its own package's __init__ is
    # not an import of another module's code, so the __init__ files are left out of the cycle search.
    inits = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    graph = {name: edges - inits for name, edges in graph.items() if name not in inits}
    assert _cycle(graph) is None


def test_no_module_imports_more_than_a_third_of_the_package():
    """The command line aside (it wires every stage to flags), a module that imports a third of the package is
    doing more than one job."""
    graph = import_graph()
    modules = [name for name in graph if not (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()]
    heavy = {name: len(graph[name]) for name in modules
             if len(graph[name]) > len(modules) / 3 and not name.startswith("hf_influence.cli.")}
    assert not heavy, f"modules importing more than a third of the {len(modules)} modules: {heavy}"


def test_no_public_name_shadows_a_module():
    """`import hf_influence.x as m` must give the module x, not a function the package exports under that name."""
    import importlib
    import types

    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package, _, leaf = name.rpartition(".")
        if not package or leaf.startswith("__"):
            continue
        attribute = getattr(importlib.import_module(package), leaf, None)
        assert attribute is None or isinstance(attribute, types.ModuleType), f"{package}.{leaf} is {attribute!r}"


@pytest.mark.parametrize("registry, readme_row, config, field", [
    ("METHODS", "| methods (`method=`)", "SelectionConfig", "method"),
    ("ORACLES", "| oracles |", "NNCIFTConfig", "oracle"),
])
def test_every_registered_name_is_documented(registry, readme_row, config, field):
    """Where docs/architecture.md says a method or an oracle is documented: README's row and the help of the
    option that takes its name. A registered name missing from either fails."""
    import hf_influence
    from hf_influence import options

    readme = (PACKAGE.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(readme_row))
    help_text = getattr(options, config).__dataclass_fields__[field].metadata["help"]
    for name in getattr(hf_influence, registry):
        assert f"`{name}`" in row, f"README's row {readme_row!r} does not name {name}"
        assert f'"{name}"' in help_text, f"{config}.{field}'s help does not name {name}"


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists the packages explicitly (model_cards/ installs as hf_influence.model_cards): a new stage
    package missing from that list would work in an editable install and be absent from the wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
