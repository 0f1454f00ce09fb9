"""The package's import graph: acyclic, and layered so that the command line sits on top.

The graph is read with ``ast`` from every ``import ldm_vae.x`` / ``from .x import`` / ``from ..x import``
statement, at module level and inside functions alike (a lazy import still closes a cycle once it runs).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import ldm_vae

ROOT = Path(ldm_vae.__file__).parent
# The autoencoders and their I/O: they never reach up into the workflows, the CLI, the demo or training.
LOWER = [
    *("modules", "autoencoder_kl", "autoencoder_kl_flux2", "autoencoder_tiny", "vq", "config", "checkpoint"),
    "pretrained",
    *("images", "tiling"),
    *("distributions", "metrics", "runtime", "interface", "autoencoders", "io", "checks", "seeds"),
    *("losses", "latents", "ldm", "ldm_pipeline", "latent_regularizers", "activations", "digits"),
]
UPPER = ("ldm_vae.workflows", "ldm_vae.cli", "ldm_vae.demo", "ldm_vae.training")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, whether it is a package's __init__)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the ldm_vae modules it imports (a package's __init__ counts for each submodule under it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = here[: len(here) - node.level + 1]  # level 1: this package, 2: its parent...
                base = node.module if node.level == 0 else ".".join([*package, *filter(None, [node.module])])
                # `from . import x` imports the submodule x when there is one, else a name of the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                # Importing a.b.c runs a.b's __init__ too (bar the importer's own packages, already running).
                for k in range(2, len(parts) + 1):
                    dep = ".".join(parts[:k])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


GRAPH = _graph()


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _importers(package: str) -> set[str]:
    """The modules outside ``package`` that import it or one of its submodules."""
    return {
        m for m, deps in GRAPH.items() if not _inside(m, package) and any(_inside(d, package) for d in deps)
    }


def test_the_graph_sees_the_package():
    assert {"ldm_vae.cli", "ldm_vae.demo", "ldm_vae.workflows", "ldm_vae.autoencoders"} <= set(GRAPH)
    assert "ldm_vae.workflows" in GRAPH["ldm_vae.cli"] and "ldm_vae.demo" in GRAPH["ldm_vae.cli"]
    assert "ldm_vae.training.data" in GRAPH["ldm_vae.training.train_vae"]  # a submodule import is an edge


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_layers_point_down():
    assert _importers("ldm_vae.cli") == set()
    assert _importers("ldm_vae.demo") == {"ldm_vae.cli"}
    assert _importers("ldm_vae.workflows") == {"ldm_vae.cli", "ldm_vae.demo"}
    lower = [f"ldm_vae.{name}" for name in LOWER]
    assert set(lower) <= set(GRAPH)
    for module in lower:
        upward = {d for d in GRAPH[module] if any(_inside(d, u) for u in UPPER)}
        assert not upward, f"{module} imports {sorted(upward)}"


def test_workflows_import_without_argparse():
    tree = ast.parse("\n".join(p.read_text() for p in sorted((ROOT / "workflows").glob("*.py"))))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "argparse" not in names
