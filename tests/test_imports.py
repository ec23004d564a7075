"""The package's imports run one way: no module of nanopalm/ imports, at any depth and inside functions too, a
module that imports it back (a circle makes the import order matter and the files impossible to read alone)."""

import ast

from conftest import REPO

from nanopalm import checkpoint, sharded


def package_imports(folder: str = "nanopalm") -> dict[str, set[str]]:
    """{module: the nanopalm modules it imports}, from the source: top-level and function-level imports alike."""
    graph = {}
    for path in sorted((REPO / folder).glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "nanopalm":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanopalm."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nanopalm.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = package_imports()
    assert graph["checkpoint"] >= {"sharded"} and graph["trainer"] >= {"evaluate"}  # the graph is really read
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                circles.append(path[path.index(target):] + [target])
            elif target in graph:
                visit(target, path + [target])

    for module in graph:
        visit(module, [module])
    assert not circles, f"import circles: {sorted({' -> '.join(c) for c in circles})}"


def test_the_two_names_of_a_sharded_checkpoints_index_agree():
    """checkpoint.py names DCP's index without importing DCP (a second to import); sharded.py owns the format."""
    assert checkpoint.SHARD_INDEX == sharded.INDEX_FILE == ".metadata"


def test_the_core_imports_none_of_the_tools():
    """nanopalm/tools/ (benchmarks, the ablation study) builds on the core; nothing in the core needs it."""
    core = package_imports()
    assert "trainer" in core and not any("tools" in imported for imported in core.values()), core
    assert package_imports("nanopalm/tools")["ablate"] >= {"config", "trainer"}  # the tools do import the core
