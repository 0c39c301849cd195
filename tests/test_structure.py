"""The package's structure, checked from its source: small core functions, layered imports,
one registry of merge methods (issue #23)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clair_cli"
MAX_LINES = 80
MAX_PARAMETERS = 8


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters other than self and cls; ``*args`` and ``**kwargs`` count one each."""
    a = node.args
    named = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
    return len(named) + (a.vararg is not None) + (a.kwarg is not None)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_core_functions_are_short_and_take_few_parameters() -> None:
    too_long, too_many = [], []
    for path in _modules(PACKAGE / "core"):
        for fn in _functions(path):
            where = f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"
            lines = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if lines > MAX_LINES:
                too_long.append(f"{where} ({lines} lines)")
            if _parameters(fn) > MAX_PARAMETERS:
                too_many.append(f"{where} ({_parameters(fn)} parameters)")
    assert not too_long, f"functions over {MAX_LINES} lines: {too_long}"
    assert not too_many, f"functions over {MAX_PARAMETERS} parameters (group them in a dataclass): {too_many}"


def test_parameter_count_rule() -> None:
    fn = next(_functions_of("def f(self, a, b=1, *args, c, **kwargs): pass"))
    assert _parameters(fn) == 5


def _functions_of(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            yield node


# What each layer may import from clair_cli: core is pure tensor math; params, types, results,
# errors and constants sit below io, report and cli; cli wires everything.
LOWER = ("clair_cli.errors", "clair_cli.constants")
ALLOWED = {
    "core": ("clair_cli.core", *LOWER),
    "params.py": LOWER,
    "types.py": (*LOWER, "clair_cli.io.patterns"),
    "results.py": ("clair_cli.params", "clair_cli.core", "clair_cli.io.adapter", *LOWER),
    "methods": ("clair_cli.methods", "clair_cli.core", "clair_cli.params", "clair_cli.results", *LOWER),
}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_is_below_them(layer: str) -> None:
    target = PACKAGE / layer
    paths = _modules(target) if target.is_dir() else [target]
    wrong = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in paths
        for name in _imports(p)
        if name.startswith("clair_cli") and not name.startswith(ALLOWED[layer])
    }
    assert not wrong, wrong


def test_core_imports_no_terminal_file_or_hub_library() -> None:
    banned = ("rich", "typer", "click", "safetensors", "huggingface_hub", "matplotlib")
    wrong = {
        f"{p.relative_to(ROOT)}: {name}"
        for p in _modules(PACKAGE / "core")
        for name in _imports(p)
        if name.split(".")[0] in banned
    }
    assert not wrong, wrong


def test_only_the_executors_import_ray() -> None:
    """Ray is an extra (clair-lora[ray]), imported by clair_cli/executors.py alone, and only when asked for."""
    wrong = {
        str(p.relative_to(ROOT))
        for p in _modules(PACKAGE)
        if p.name != "executors.py" and any(name.split(".")[0] == "ray" for name in _imports(p))
    }
    assert not wrong, wrong


def test_benchmarks_and_experiments_do_not_import_tests() -> None:
    wrong = {
        f"{p.relative_to(ROOT)}: {name}"
        for folder in ("benchmarks", "experiments", "fuzz")
        for p in _modules(ROOT / folder)
        for name in _imports(p)
        if name.split(".")[0] in ("tests", "helpers", "synthetic", "conftest")
    }
    assert not wrong, wrong


def test_pipeline_never_asks_for_a_merge_method_by_name() -> None:
    from clair_cli import methods

    names = set(methods.NAMES)
    tree = ast.parse((PACKAGE / "pipeline.py").read_text())
    compared = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators])
    ]
    assert not compared, compared


def test_every_registered_method_is_a_complete_object() -> None:
    from clair_cli import methods

    for name, method in methods.REGISTRY.items():
        assert method.name == name and method.min_adapters >= 1 and method.description
        assert type(method).merge_module is not methods.MergeMethod.merge_module, name
        if isinstance(method, methods.Baseline):
            from clair_cli.core import baselines

            assert callable(getattr(baselines, method.function, None)), (name, method.function)
