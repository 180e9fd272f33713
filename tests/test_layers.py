"""The one-way direction of imports between parcae's layers (README "Layout", docs/layout.md), checked on the source.

Layers, lowest first (``a | b``: side by side, neither imports the other)::

    ground <- model <- hf <- data <- runs <- inference <- training | eval | interop <- analysis <- experiments <- cli

Every module of ``parcae/`` and ``data_prep/`` is named in :data:`MODULES` (a module not named there fails
:func:`test_every_module_is_named_in_the_table`: nothing falls into a layer by default). Each module's imports —
top-level and inside functions — are read with ``ast``; a module may import from its own layer and the layers
below it, never from a layer above, and never from a sibling beside it. Ground, model, hf, runs and inference are
plain PyTorch: they must not import Lightning or LitData at all (and a fresh interpreter shows that importing
them loads neither). Only the cli and experiments layers use ``parcae.training`` from outside it.

Calls go the same way: a function is never parked on another object (``model.generate_fn = predict``: the object
would call code it cannot see), and a module never hands a lower layer a function imported from a layer above that
lower one (``runs.f(callback=eval.g)``: an upward call by the back door). A module's own local functions may be
passed down as callbacks (``write_folder_atomically(out, fill)``): they are the caller's code, called on its behalf.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Layer -> its number, lowest first; a module may import from layers with a number <= its own.
LAYERS = {"ground": 0, "model": 1, "hf": 2, "data": 3, "runs": 4, "inference": 5,
          "training": 6, "eval": 6, "interop": 6, "analysis": 7, "experiments": 8, "cli": 9}
SIBLINGS = {"training", "eval", "interop"}  # share a number, sit beside each other: none imports another
PLAIN_PYTORCH = ("ground", "model", "hf", "runs", "inference")  # no Lightning, no LitData
TRAINING_USERS = ("training", "cli", "experiments")  # who may import parcae.training
LIGHTNING = ("lightning", "pytorch_lightning", "litdata")
# Every module, by name, in its layer. Add a new module here (and to the README table when it is a new package).
MODULES = {
    # imports nothing of parcae above it: errors, checks of configs and options, resource limits, verb parsing
    "ground": ["parcae", "parcae.errors", "parcae.validation", "parcae.options", "parcae.resources",
               "parcae.command_line"],
    "model": ["parcae.model", "parcae.model.__main__", "parcae.model.config", "parcae.model.depth",
              "parcae.model.flops", "parcae.model.init", "parcae.model.injection", "parcae.model.layers",
              "parcae.model.loop", "parcae.model.looped", "parcae.model.loss", "parcae.model.official",
              "parcae.model.state"],
    # transformers classes and the vLLM plugin, copied into exported folders (tests/hf checks what they import)
    "hf": ["parcae.hf", "parcae.hf.configuration_parcae", "parcae.hf.modeling_parcae", "parcae.hf.vllm_model",
           "parcae.hf.vllm_plugin"],
    "data": ["parcae.data", "parcae.data.datamodule", "parcae.data.shards", "parcae.data.tokenizer",
             "data_prep", "data_prep.shakespeare", "data_prep.shards", "data_prep.sources", "data_prep.tokenizer"],
    "runs": ["parcae.runs", "parcae.runs.checkpoint", "parcae.runs.errors", "parcae.runs.layout",
             "parcae.runs.lock", "parcae.runs.output", "parcae.runs.rundir", "parcae.runs.storage"],
    "inference": ["parcae.inference", "parcae.inference.cache", "parcae.inference.cli", "parcae.inference.compiled",
                  "parcae.inference.depth_batching",
                  "parcae.inference.elastic",
                  "parcae.inference.engine", "parcae.inference.exits", "parcae.inference.options",
                  "parcae.inference.scheduler", "parcae.inference.serve", "parcae.inference.speculative"],
    "training": ["parcae.training", "parcae.training.callbacks", "parcae.training.consolidate",
                 "parcae.training.module", "parcae.training.optim", "parcae.training.run",
                 "parcae.training.sharding"],
    "eval": ["parcae.eval", "parcae.eval.core", "parcae.eval.lm_eval_adapter", "parcae.eval.perplexity"],
    "interop": ["parcae.interop", "parcae.interop.commands", "parcae.interop.hf_folder", "parcae.interop.release",
                "parcae.interop.runs"],
    "analysis": ["parcae.analysis", "parcae.analysis.fits", "parcae.analysis.scaling"],
    "experiments": ["parcae.experiments", "parcae.experiments.miniatures", "parcae.experiments.report",
                    "parcae.experiments.scaling_study", "parcae.experiments.sweep",
                    "parcae.experiments.test_report"],
    "cli": ["parcae.cli", "parcae.__main__", "parcae.lightning_cli"],
}
LAYER_OF_MODULE = {module: layer for layer, modules in MODULES.items() for module in modules}


def layer_of(module: str) -> str | None:
    """The layer of a module, or of a name inside one (``parcae.runs.load_checkpoint``): the longest listed module
    it starts with. None for anything outside parcae and data_prep."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        layer = LAYER_OF_MODULE.get(".".join(parts[:n]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(text: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``text``, the source of ``module``; ``from parcae import
    training`` counts as an import of ``parcae.training``."""
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
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in LAYER_OF_MODULE else target))
    return sorted(set(found))


def upward_imports(text: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    problems = []
    for line, target in imported_modules(text, module, is_package):
        other = layer_of(target)
        if other is not None and LAYERS[other] > LAYERS[own]:
            problems.append(f"line {line} imports {target} ({other} is above {own})")
        elif other is not None and other != own and {other, own} <= SIBLINGS:
            problems.append(f"line {line} imports {target} ({other} sits beside {own}, not below it)")
        if own in PLAIN_PYTORCH and target.split(".")[0] in LIGHTNING:
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


def test_every_module_is_named_in_the_table():
    """No default layer: a module that MODULES does not name fails here, and a name with no module is stale."""
    assert SOURCES
    found = {module_name(p) for p in SOURCES}
    unnamed = sorted(found - set(LAYER_OF_MODULE))
    assert not unnamed, f"modules named in no layer (add them to MODULES and, if a package, the README): {unnamed}"
    stale = sorted(set(LAYER_OF_MODULE) - found)
    assert not stale, f"MODULES names modules that do not exist: {stale}"
    assert sum(map(len, MODULES.values())) == len(LAYER_OF_MODULE), "a module is named in two layers"
    assert set(MODULES) == set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_and_calls_flow_one_way(path):
    text, module, package = path.read_text(), module_name(path), path.name == "__init__.py"
    assert module in LAYER_OF_MODULE, f"{module} is named in no layer"
    problems = upward_imports(text, module, package) + upward_calls(text, module, package)
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_only_the_command_line_and_experiments_use_training():
    users = sorted({module_name(p) for p in SOURCES
                    for _, target in imported_modules(p.read_text(), module_name(p), p.name == "__init__.py")
                    if layer_of(target) == "training"})
    assert users and all(layer_of(u) in TRAINING_USERS for u in users), \
        [u for u in users if layer_of(u) not in TRAINING_USERS]


def layer_chain() -> str:
    """The layer order as README.md and docs/layout.md write it: ``ground ← model ← ... ← cli``."""
    by_number: dict[int, list[str]] = {}
    for layer, number in LAYERS.items():
        by_number.setdefault(number, []).append(layer)
    return " ← ".join(" | ".join(by_number[n]) for n in sorted(by_number))


@pytest.mark.parametrize("doc", ["README.md", "docs/layout.md"])
def test_the_docs_state_this_order(doc):
    """README.md and docs/layout.md write the same layer order as this test enforces, word for word."""
    chain = layer_chain()
    assert chain == ("ground ← model ← hf ← data ← runs ← inference ← training | eval | interop ← analysis ← "
                     "experiments ← cli")
    assert chain in " ".join((ROOT / doc).read_text().split()), f"{doc} does not state the layer order {chain!r}"


def test_plain_pytorch_layers_load_no_lightning_in_a_fresh_interpreter():
    """Importing the model, the runs and the inference engine (and the command line's entry module) in a new
    interpreter loads no Lightning or LitData module: ``parcae generate`` and ``parcae serve`` never pay for them."""
    code = ("import sys, parcae.model, parcae.runs, parcae.inference, parcae.inference.cli, parcae.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'litdata'}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_fresh_interpreter_check_sees_lightning():
    """The check above can fail: importing the training module in the same way shows Lightning."""
    code = ("import sys, parcae.training.module\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'litdata'}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "lightning" in out.stdout, out.stdout + out.stderr


def test_the_check_catches_upward_and_lightning_imports():
    """The checker itself, on made-up sources: function-level and relative imports are seen."""
    inside_function = "def f():\n    from parcae.training.module import LoopedLMModule\n"
    assert upward_imports(inside_function, "parcae.model.looped") == [
        "line 2 imports parcae.training.module (training is above model)"]
    relative = "from ..experiments import sweep\n"
    assert upward_imports(relative, "parcae.analysis.fits") == [
        "line 1 imports parcae.experiments.sweep (experiments is above analysis)"]
    assert upward_imports("from parcae import training\n", "parcae.eval.core") == [
        "line 1 imports parcae.training (training sits beside eval, not below it)"]
    assert upward_imports("from parcae.cli import main\n", "parcae.command_line") == [
        "line 1 imports parcae.cli (cli is above ground)"]
    assert upward_imports("import litdata\n", "parcae.runs.checkpoint")[0].endswith("is plain PyTorch")
    assert upward_imports("import lightning as L\n", "parcae.inference.engine")[0].endswith("is plain PyTorch")
    assert upward_imports("from parcae.model import LoopedLM\nfrom .module import X\n", "parcae.training.run") == []
    assert upward_imports("from parcae.training.module import M\n", "parcae.eval.core") == [
        "line 1 imports parcae.training.module (training sits beside eval, not below it)"]
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
        "line 4 hands parcae.eval.core.score (eval) to parcae.runs.save (runs), which may not call it"]
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
