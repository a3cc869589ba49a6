"""The package's structure, checked on its source: the library never imports the experiment application, the
torch-only core never imports stable-baselines3, method names are compared only in the method registry, and
``adapt`` resolves its adapter plan once; in the application wing, no module but the run folder names a run's files,
no study module imports another, and long functions carry signpost comments.

``python -m tests.test_architecture`` prints the module and import-arrow counts and the wing's figures.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import gymnasium as gym
import pytest

import eva_rl
from eva_rl.plan import AdapterPlan
from tests.conftest import make_pretrained

PACKAGE = Path(eva_rl.__file__).resolve().parent
APPLICATION = "eva_rl.experiments"
ENTRY_POINTS = {"eva_rl.__main__"}  # `python -m eva_rl` starts the application's command line
CORE = {
    "eva_rl.allocation",
    "eva_rl.config",
    "eva_rl.errors",
    "eva_rl.eva",
    "eva_rl.eva_report",
    "eva_rl.inits",
    "eva_rl.inject",
    "eva_rl.ipca",
    "eva_rl.layers",
    "eva_rl.methods",
    "eva_rl.plan",
}
"""The torch-only core: usable on any ``nn.Module`` without stable-baselines3."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str) -> set[str]:
    """Every module an import statement anywhere in ``source`` names (``from m import x`` counts ``m`` and ``m.x``,
    since ``x`` may be a submodule); function-level imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """``{module: every name it imports}`` for each module of the package."""
    return {module_name(path): imported_names(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def package_arrows(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``; the package's ``__init__`` is not an arrow target."""
    return {
        module: {name for name in names if name in graph and name not in ("eva_rl", module)}
        for module, names in graph.items()
    }


def reachable(arrows: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in arrows[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def is_application(module: str) -> bool:
    return module == APPLICATION or module.startswith(APPLICATION + ".")


def library_violations(graph: dict[str, set[str]]) -> list[str]:
    """Library modules that import the application, directly or through other modules."""
    arrows = package_arrows(graph)
    return [
        f"{module} -> {target}"
        for module in graph
        if not is_application(module) and module not in ENTRY_POINTS
        for target in sorted(reachable(arrows, module))
        if is_application(target)
    ]


def core_violations(graph: dict[str, set[str]], core: Iterable[str] = CORE) -> list[str]:
    """Core modules that import stable_baselines3, directly or through other modules."""
    arrows = package_arrows(graph)
    return [
        f"{module} (via {source})"
        for module in core
        for source in sorted({module} | reachable(arrows, module))
        if any(name == "stable_baselines3" or name.startswith("stable_baselines3.") for name in graph[source])
    ]


def method_name_comparisons(source: str, names: Iterable[str]) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``) of a method with a method-name literal or a collection of them.

    A comparison counts when one side is such a literal and the other side mentions a method (``method``,
    ``spec.method``, ``result["method"]``), so ``svd_solver == "full"`` is not mistaken for one.
    """
    names = set(names)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]

        def is_literal(operand: ast.expr) -> bool:
            items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            return any(isinstance(item, ast.Constant) and item.value in names for item in items)

        literal = [o for o in operands if is_literal(o)]
        others = [o for o in operands if not is_literal(o)]
        if literal and any("method" in ast.unparse(o).lower() for o in others):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_library_never_imports_the_application() -> None:
    graph = import_graph()
    assert any(is_application(m) for m in graph) and any(not is_application(m) for m in graph)
    assert library_violations(graph) == []


def test_the_core_never_imports_stable_baselines3() -> None:
    graph = import_graph()
    assert set(graph) >= CORE, "a core module was renamed: update CORE"
    assert core_violations(graph) == []


def test_the_layering_checks_catch_violations() -> None:
    """The checks above must be able to fail: a library module importing the application, or a core module that
    reaches stable_baselines3 through another module."""
    graph = import_graph()
    graph["eva_rl.plan"] = graph["eva_rl.plan"] | {"eva_rl.experiments.tasks"}
    assert "eva_rl.plan -> eva_rl.experiments.tasks" in library_violations(graph)
    assert "eva_rl.inject -> eva_rl.experiments.tasks" in library_violations(graph), "indirect imports count"
    graph = import_graph()
    graph["eva_rl.ipca"] = graph["eva_rl.ipca"] | {"eva_rl.policies"}
    assert "eva_rl.ipca (via eva_rl.policies)" in core_violations(graph)


def test_no_module_outside_the_registry_compares_method_names() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path) == "eva_rl.methods":
            continue
        found = method_name_comparisons(path.read_text(), eva_rl.METHODS)
        if found:
            offenders[module_name(path)] = found
    assert offenders == {}


def test_the_method_name_check_catches_comparisons() -> None:
    source = (
        'if method in ("pissa", "olora"):\n    pass\n'
        'dispatch = result["method"] == "eva"\n'
        'fine = get_method("eva")\n'
        'solver = svd_solver == "full"\n'
    )
    assert len(method_name_comparisons(source, eva_rl.METHODS)) == 2


@pytest.mark.filterwarnings("ignore:(EVA|pissa):UserWarning")
@pytest.mark.parametrize("method", ["eva", "lora", "pissa", "head", "eva-from-ppo"])
def test_adapt_resolves_the_adapter_plan_once(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    resolve = AdapterPlan.resolve.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0].__class__.__name__)
        return resolve(cls, *args, **kwargs)

    monkeypatch.setattr(AdapterPlan, "resolve", classmethod(counting))
    base = make_pretrained("mlp-discrete")
    eva = eva_rl.EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn")
    if method == "eva-from-ppo":
        eva = eva_rl.EvaConfig(batch_size=64, max_batches=60, on_max_batches="warn", data_source="ppo")
        method = "eva"
    model = eva_rl.adapt(base, gym.make("CartPole-v1"), method, eva_rl.LoraConfig(r=2), eva, n_steps=128)
    if isinstance(model, eva_rl.EvaPPO):
        model.learn(128 * 30)
        assert not model.eva_pending
    assert calls == ["ActorCriticPolicy"], "the plan is resolved once, on the pretrained policy"
    assert model.policy.lora_plan.method == method


def counts() -> dict[str, int]:
    """Modules and import arrows at the top level of ``eva_rl/`` (the library) and in the application."""
    graph = import_graph()
    arrows = package_arrows(graph)
    library = [m for m in graph if not is_application(m)]
    application = [m for m in graph if is_application(m)]
    return {
        "library_modules": len(library),
        "library_arrows": sum(len(arrows[m] - {m}) for m in library if m != "eva_rl"),
        "application_modules": len(application),
        "application_internal_arrows": sum(len({t for t in arrows[m] if is_application(t)}) for m in application),
        "application_to_library_arrows": sum(len({t for t in arrows[m] if not is_application(t)}) for m in application),
    }


# The application wing: one run folder object, one shape of study.

STUDIES = "eva_rl.experiments.studies"


def run_file_names() -> set[str]:
    """The file names a run folder holds, as :class:`~eva_rl.experiments.run_folder.RunFolder` and its
    :class:`~eva_rl.experiments.run_folder.Checkpoint` declare them."""
    from eva_rl.experiments.run_folder import Checkpoint, RunFolder

    return {
        value
        for owner in (RunFolder, Checkpoint)
        for name, value in vars(owner).items()
        if name.isupper() and isinstance(value, str) and "." in value and "*" not in value
    }


def docstrings(tree: ast.AST) -> set[int]:
    """``id``s of the docstring constants of ``tree`` (documentation may name files)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.add(id(node.value))  # attribute docstrings
    return found


def run_file_literals(source: str, names: Iterable[str]) -> list[str]:
    """String literals (docstrings aside) that spell a run file's name."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    names = sorted(names)
    return [
        f"line {node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
        for name in names
        if name in node.value
    ]


def test_no_module_but_the_run_folder_names_a_run_file() -> None:
    names = run_file_names()
    assert {"result.json", "model.zip", "eva.json", "checkpoint.zip", "state.json", "replay_buffer.pkl"} <= names
    offenders = {
        module_name(path): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if is_application(module_name(path)) and module_name(path) != "eva_rl.experiments.run_folder"
        for found in [run_file_literals(path.read_text(), names)]
        if found
    }
    assert offenders == {}


def study_import_violations(graph: dict[str, set[str]]) -> list[str]:
    """Study modules that import another study module (the shared ``base`` aside)."""
    studies = {m for m in graph if m.startswith(STUDIES + ".")} - {f"{STUDIES}.base"}
    return [f"{module} -> {target}" for module in sorted(studies) for target in sorted(graph[module] & studies)]


def test_no_study_module_imports_another() -> None:
    graph = import_graph()
    assert {f"{STUDIES}.suite", f"{STUDIES}.ranks", f"{STUDIES}.tuning", f"{STUDIES}.continual"} <= set(graph)
    assert study_import_violations(graph) == []


def test_the_wing_checks_catch_violations() -> None:
    graph = import_graph()
    graph[f"{STUDIES}.ranks"] = graph[f"{STUDIES}.ranks"] | {f"{STUDIES}.suite"}
    assert study_import_violations(graph) == [f"{STUDIES}.ranks -> {STUDIES}.suite"]
    source = '"""Reads result.json."""\npath = run_dir / "result.json"\nname = f"{x}/model.zip"\n'
    assert run_file_literals(source, run_file_names()) == ["line 2: 'result.json'", "line 3: '/model.zip'"]


def long_functions_without_comments(source: str, lines: int = 30) -> list[str]:
    """Functions of more than ``lines`` lines with no ``#`` comment in their body (no signposts)."""
    text = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > lines:
            body = text[node.lineno : node.end_lineno]
            if not any(line.lstrip().startswith("#") or "  # " in line for line in body):
                found.append(f"{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_long_functions_of_the_wing_carry_signposts() -> None:
    offenders = {
        module_name(path): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if is_application(module_name(path))
        for found in [long_functions_without_comments(path.read_text())]
        if found
    }
    assert offenders == {}


def wing_figures() -> dict[str, float]:
    """The application wing's figures: modules, lines, comment density, how many ways a run is derived, carried out,
    and its files named."""
    from eva_rl.experiments.execute import Executor

    paths = [path for path in sorted(PACKAGE.rglob("*.py")) if is_application(module_name(path))]
    sources = {module_name(path): path.read_text() for path in paths}
    lines = sum(len(source.splitlines()) for source in sources.values())
    comments = sum(
        1
        for source in sources.values()
        for line in source.splitlines()
        if line.lstrip().startswith("#") or "  # " in line
    )
    names = run_file_names()
    return {
        "modules": len(sources),
        "study_modules": sum(m.startswith(STUDIES + ".") and not m.endswith((".base", STUDIES)) for m in sources),
        "lines": lines,
        "comment_lines_per_100": round(100 * comments / lines, 2),
        "task_derivations": sum("def with_overrides(" in s for s in sources.values()),
        "executors": len(Executor.__subclasses__()) + sum(len(c.__subclasses__()) for c in Executor.__subclasses__()),
        "modules_naming_run_files": sum(bool(run_file_literals(s, names)) for s in sources.values()),
        "long_functions_without_signposts": sum(len(long_functions_without_comments(s)) for s in sources.values()),
    }


if __name__ == "__main__":
    print(counts())
    print(wing_figures())
