"""The one-way direction of imports between parcae's layers (README "Layout"), checked on the source itself.

Each module's imports — top-level and inside functions — are read with ``ast``; a module may import from its own
layer and the layers below it, never from a layer above, and never from a sibling beside it (eval, interop and
training share layer 5 and use none of each other). ``parcae.model``, ``parcae.runs`` and ``parcae.inference`` are
plain PyTorch: they must not import Lightning at all. Only ``parcae.cli`` and ``parcae.experiments`` may use
``parcae.training`` from outside it.

Calls go the same way: a function is never parked on another object (``model.generate_fn = predict``: the object
would call code it cannot see), and a module never hands a lower layer a function imported from a layer above that
lower one (``runs.f(callback=eval.g)``: an upward call by the back door). A module's own local functions may be
passed down as callbacks (``write_folder_atomically(out, fill)``): they are the caller's code, called on its behalf.
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
# Layers that share a number but sit beside each other: none imports another.
SIBLINGS = {"parcae.eval", "parcae.interop", "parcae.training"}
PLAIN_PYTORCH = ("parcae.model", "parcae.runs", "parcae.inference")
TRAINING_USERS = ("parcae.training", "parcae.cli", "parcae.experiments")  # who may import parcae.training


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
        elif other is not None and other != own and {other, own} <= SIBLINGS:
            problems.append(f"line {line} imports {target} ({other} sits beside {own}, not below it)")
        if own in PLAIN_PYTORCH and target.split(".")[0] in ("lightning", "pytorch_lightning", "litdata"):
            problems.append(f"line {line} imports {target}: {own} is plain PyTorch")
    return problems


def imported_names(text: str, module: str, is_package: bool = False) -> dict[str, str]:
    """Local name -> the absolute module it comes from (``from parcae.inference import generate`` ->
    ``generate: parcae.inference.generate``; ``import parcae.runs as runs`` -> ``runs: parcae.runs``)."""
    tree = ast.parse(text)
    package = module if is_package else module.rsplit(".", 1)[0]
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                    alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                names[alias.asname or alias.name] = f"{source}.{alias.name}"
    return names


def _origin(node: ast.AST, names: dict[str, str]) -> str | None:
    """The absolute dotted name an expression ``a.b.c`` refers to, when ``a`` is imported; else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in names:
        return ".".join([names[node.id], *parts])
    return None


def _is_function_reference(node: ast.AST, names: dict[str, str], local_functions: set[str]) -> bool:
    if isinstance(node, ast.Lambda):
        return True
    if isinstance(node, ast.Name) and node.id in local_functions:
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and \
            (_origin(node.func, names) or "").endswith("functools.partial"):
        return True
    origin = _origin(node, names) if isinstance(node, (ast.Name, ast.Attribute)) else None
    return origin is not None and origin.startswith(("parcae.", "data_prep.")) and \
        origin.rsplit(".", 1)[-1][:1].islower()  # a function (lower case), not a class or constant


def upward_calls(text: str, module: str, is_package: bool = False) -> list[str]:
    """Functions parked on other objects, and functions of a higher layer handed to a lower one."""
    tree = ast.parse(text)
    names = imported_names(text, module, is_package)
    local_functions = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and node.value is not None and \
                        not (isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")) and \
                        _is_function_reference(node.value, names, local_functions):
                    problems.append(f"line {node.lineno} parks a function on {ast.unparse(target)}: pass it as an "
                                    "argument or let the owner import it")
        elif isinstance(node, ast.Call):
            callee = _origin(node.func, names) if isinstance(node.func, (ast.Name, ast.Attribute)) else None
            callee_layer = layer_of(callee) if callee else None
            if callee_layer is None:
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                origin = _origin(arg, names) if isinstance(arg, (ast.Name, ast.Attribute)) else None
                arg_layer = layer_of(origin) if origin else None
                if arg_layer is not None and _is_function_reference(arg, names, set()) and \
                        (LAYERS[arg_layer] > LAYERS[callee_layer] or
                         (arg_layer != callee_layer and {arg_layer, callee_layer} <= SIBLINGS)):
                    problems.append(f"line {node.lineno} hands {origin} ({arg_layer}) to {callee} "
                                    f"({callee_layer}), which may not call it")
    return problems


SOURCES = sorted(p for d in ("parcae", "data_prep") for p in (ROOT / d).rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    assert SOURCES
    unplaced = [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS and the README layout): {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_and_calls_flow_one_way(path):
    text, module, package = path.read_text(), module_name(path), path.name == "__init__.py"
    problems = upward_imports(text, module, package) + upward_calls(text, module, package)
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_only_the_command_line_and_experiments_use_training():
    users = sorted({module_name(p) for p in SOURCES
                    for _, target in imported_modules(p.read_text(), module_name(p), p.name == "__init__.py")
                    if layer_of(target) == "parcae.training"})
    assert users and all(layer_of(u) in TRAINING_USERS for u in users), \
        [u for u in users if layer_of(u) not in TRAINING_USERS]


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
    assert upward_imports("from parcae.training.module import M\n", "parcae.eval.core") == [
        "line 1 imports parcae.training.module (parcae.training sits beside parcae.eval, not below it)"]
    assert upward_imports("from ..inference import Engine\n", "parcae.eval.core") == []


def test_the_check_catches_parked_functions_and_callables_handed_down():
    """The call checker on made-up sources: parking, partials, lambdas, handing an upper function down."""
    parked = "from parcae.inference import predict\ndef f(module):\n    module.net.generate_fn = predict\n"
    assert upward_calls(parked, "parcae.experiments.x") == [
        "line 3 parks a function on module.net.generate_fn: pass it as an argument or let the owner import it"]
    partial = "import functools\nfrom parcae.eval import core\ndef f(m):\n    m.score = functools.partial(core.run, 1)\n"
    assert len(upward_calls(partial, "parcae.cli")) == 1
    assert len(upward_calls("def f(m):\n    m.hook = lambda x: x\n", "parcae.cli")) == 1
    own = "def g(): pass\ndef f(m):\n    m.hook = g\n"
    assert len(upward_calls(own, "parcae.training.run")) == 1
    handed = ("from parcae.runs import save\nfrom parcae.eval.core import score\n"
              "def f():\n    save(callback=score)\n")
    assert upward_calls(handed, "parcae.cli") == [
        "line 4 hands parcae.eval.core.score (parcae.eval) to parcae.runs.save (parcae.runs), which may not call it"]
    sideways = "from parcae import training, eval\ndef f():\n    training.fit(eval.core.score)\n"
    assert len(upward_calls(sideways, "parcae.cli")) == 1
    # allowed: own attributes, objects (not functions), a lower function handed to a higher one, local callbacks
    fine = ("from parcae.runs import write\nfrom parcae.model import parse_loops, LoopedLM\n"
            "from parcae.training import fit\n"
            "def fill(d): pass\n"
            "class C:\n    def __init__(self):\n        self.parse = parse_loops\n"
            "def f(m):\n    m.net = LoopedLM(1)\n    write('out', fill)\n    fit(parse=parse_loops)\n")
    assert upward_calls(fine, "parcae.cli") == []


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
