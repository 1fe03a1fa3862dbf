"""The structure stays as docs/architecture.md draws it: the import-linter contracts in pyproject.toml
hold (layers import downward only, the foundation modules import no layer), no module imports itself
back through others, ruff is clean, and the docs link only to files that exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _run(*command: str) -> subprocess.CompletedProcess:
    """A tool on this checkout's sources (not an installed copy), from the repository root."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _tool(name: str) -> str:
    """The console script installed beside this Python, else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else name


def test_import_contracts_are_kept():
    result = _run(_tool("lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_module_graph_has_no_cycle():
    """Every import counts, those inside functions and under TYPE_CHECKING too: a module that needs
    another only lazily still depends on it. The root package is left out: it re-exports LLM from
    llmasos.api for users, and nothing inside imports it."""
    import grimp
    import networkx  # a dependency of torch

    sys.path.insert(0, str(SRC))  # grimp finds the package by import; this checkout's, not an installed one
    try:
        graph = grimp.build_graph("llmasos", cache_dir=None)
    finally:
        sys.path.remove(str(SRC))
    modules = graph.modules - {"llmasos"}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    digraph = networkx.DiGraph([(m, n) for m, imported in edges.items() for n in imported])
    cycles = [sorted(c) for c in networkx.strongly_connected_components(digraph) if len(c) > 1]
    described = []
    for component in cycles:
        first, second = component[0], sorted(edges[component[0]] & set(component))[0]
        path = graph.find_shortest_chain(importer=second, imported=first) or ()
        described.append(f"{' -> '.join([first, *path])}  (all of {component})")
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_ruff_is_clean():
    ruff = _tool("ruff")
    check = _run(ruff, "check", "src", "tests")
    assert check.returncode == 0, check.stdout + check.stderr
    formatted = _run(ruff, "format", "--check", "src", "tests")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def test_the_facade_loads_no_app_until_a_model_is_made():
    """api sits above the apps but imports them lazily: `import llmasos.api` loads neither the apps
    nor an engine's module."""
    code = (
        "import sys, llmasos.api\n"
        "apps = ('tasks', 'explain', 'eval', 'safety', 'runtime.transformers_engine', 'runtime.embedder')\n"
        "print(sorted(m for m in sys.modules if m.startswith(tuple('llmasos.' + a for a in apps))))"
    )
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_docs_link_only_to_files_that_exist():
    """A map that points at moved files misleads: every relative link in the README and docs/ resolves."""
    import re

    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_test_files_have_names_of_their_own():
    """tests/ has no packages, so pytest imports each file by its name: two files with one name in two
    folders stop the whole run at collection."""
    from collections import Counter

    names = Counter(path.name for path in (ROOT / "tests").rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1]
