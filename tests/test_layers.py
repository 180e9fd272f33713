"""The one-way direction of imports between parcae's layers (README "Layout"), checked on the source itself.

Each module's imports — top-level and inside functions — are read with ``ast``; a module may import from its own
layer and the layers below it, never from a layer above. ``parcae.model`` and ``parcae.inference`` are plain
PyTorch: they must not import Lightning at all.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# lower number = lower layer; a module may import from layers with a number <= its own
LAYERS = {
    "parcae": 0, "parcae.errors": 0, "parcae.validation": 0, "parcae.options": 0,
    "parcae.model": 1,
    "parcae.hf": 1,  # self-contained transformers classes: imports nothing from parcae (tests/hf checks)
    "parcae.data": 2, "data_prep": 2,
    "parcae.runs": 3,
    "parcae.inference": 4,
    "parcae.eval": 5, "parcae.interop": 5, "parcae.training": 5,
    "parcae.analysis": 6,
    "parcae.experiments": 7,
    "parcae.cli": 8, "parcae.__main__": 8,
}
PLAIN_PYTORCH = ("parcae.model", "parcae.runs", "parcae.inference")


def layer_of(module: str) -> str | None:
    best = None
    for name in LAYERS:
        if module == name or module.startswith(name + "."):
            best = name if best is None or len(name) > len(best) else best
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(text: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``text``, the source of ``module``."""
    tree = ast.parse(text)
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target))
    return found


def upward_imports(text: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    problems = []
    for line, target in imported_modules(text, module, is_package):
        other = layer_of(target)
        if other is not None and LAYERS[other] > LAYERS[own]:
            problems.append(f"line {line} imports {target} ({other} is above {own})")
        if own in PLAIN_PYTORCH and target.split(".")[0] in ("lightning", "pytorch_lightning", "litdata"):
            problems.append(f"line {line} imports {target}: {own} is plain PyTorch")
    return problems


SOURCES = sorted(p for d in ("parcae", "data_prep") for p in (ROOT / d).rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert SOURCES
    unplaced = [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS and the README layout): {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    problems = upward_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_check_catches_upward_and_lightning_imports():
    """The checker itself, on made-up sources: function-level and relative imports are seen."""
    inside_function = "def f():\n    from parcae.training.module import LoopedLMModule\n"
    assert upward_imports(inside_function, "parcae.model.looped") == [
        "line 2 imports parcae.training.module (parcae.training is above parcae.model)"]
    relative = "from ..experiments import sweep\n"
    assert upward_imports(relative, "parcae.analysis.fits") == [
        "line 1 imports parcae.experiments (parcae.experiments is above parcae.analysis)"]
    assert upward_imports("import lightning as L\n", "parcae.inference.engine")[0].endswith("is plain PyTorch")
    assert upward_imports("from parcae.model import LoopedLM\nfrom .module import X\n", "parcae.training.run") == []


def test_the_readme_layout_table_matches_the_folders():
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    listed = {p.strip("/") for cell in re.findall(r"^\| `([^|]+)` \|", table, flags=re.M)
              for p in re.findall(r"[\w./-]+", cell.replace("`", ""))}
    packages = {f"parcae/{p.name}" for p in (ROOT / "parcae").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= listed, f"subpackages missing from the README layout: {packages - listed}"
    for entry in listed:
        path = ROOT / entry if "/" in entry or (ROOT / entry).exists() else ROOT / "parcae" / entry
        assert path.exists(), f"README layout names {entry}, which does not exist"
