"""The package's layers only point down (docs/architecture.md): no upward import, no import cycle, no
private name imported across modules — checked on the source, and at run time for a few entry modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "visiontune"

#: Bottom to top; a module may import its own layer and the layers below it.
LAYERS = [
    ("base", ["visiontune.errors", "visiontune.names", "visiontune.version", "visiontune.clock", "visiontune.progress",
              "visiontune.locations", "visiontune.distributed", "visiontune.device",
              "visiontune.files", "visiontune.stopping"]),
    ("data", ["visiontune.data"]),
    ("backbones", ["visiontune.backbones"]),
    ("inference", ["visiontune.inference"]),
    ("cache", ["visiontune.cache"]),
    ("evaluation", ["visiontune.evaluation"]),
    ("task", ["visiontune.task"]),
    ("train", ["visiontune.train"]),
    ("methods", ["visiontune.semi", "visiontune.adapt"]),
    ("artifact", ["visiontune.classifier", "visiontune.ensemble", "visiontune.runs"]),
    ("products", ["visiontune.pipeline", "visiontune.beyond", "visiontune.report", "visiontune.export", "visiontune.serve",
                  "visiontune.submission", "visiontune.doctor", "visiontune.registry",
                  "visiontune.offline_backbones"]),
    ("api", ["visiontune.api"]),
    ("cli", ["visiontune.cli", "visiontune.__main__", "visiontune"]),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming `module`."""
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                if hasattr(inner, "lineno"):
                    lines.add(inner.lineno)
    return lines


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported visiontune module, names imported from it, line) for every import in the file — at module
    level or inside a function — except those under `if TYPE_CHECKING:` (hints only, never run)."""
    tree = ast.parse(path.read_text())
    hints = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in hints:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("visiontune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visiontune") and node.level == 0:
            names = [a.name for a in node.names]
            found.append((node.module, names, node.lineno))
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_layers():
    upward = []
    for name, path in all_modules().items():
        for target, names, line in imports_of(path):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in all_modules()]
            for imported in submodules or [target]:
                if layer_of(imported) > layer_of(name):
                    upward.append(f"{name}:{line} imports {imported} ({LAYERS[layer_of(imported)][0]} is above "
                                  f"{LAYERS[layer_of(name)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    modules = all_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in imports_of(path):
            for imported in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]:
                if imported in modules and imported != name and not name.startswith(imported + "."):
                    graph[name].add(imported)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt == "visiontune":  # the package's lazy __init__ imports nothing at import time
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_across_modules():
    crossing = []
    for name, path in all_modules().items():
        for target, names, line in imports_of(path):
            crossing += [f"{name}:{line} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("module", ["visiontune.data.catalog", "visiontune.task.kinds", "visiontune.train.loop",
                                    "visiontune.train.objectives", "visiontune.runs", "visiontune.pipeline.run"])
def test_importing_a_module_loads_nothing_above_its_layer(module):
    """`python -c "import visiontune.train.loop"` really loads only its own and lower layers."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('visiontune'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    above = [m for m in loaded if m != "visiontune" and layer_of(m) > layer_of(module)]
    assert not above, f"importing {module} loaded {above}"


def _names_the_task(node: ast.AST, task_names: set[str]) -> bool:
    """A task's name as a literal ("multi-label"), or read from a task (`task.name`, `plan.task`)."""
    if isinstance(node, ast.Constant) and node.value in task_names:
        return True
    text = ast.unparse(node)
    return text.endswith("task.name") or text.endswith("task_name") or text.endswith(".task")


def test_no_module_outside_task_compares_the_task_by_name():
    """The Task routes every output (activation, decisions, export, serve, plan defaults): code outside
    visiontune/task/ asks it (`task.exclusive`, `task.tags`, `task.tunes_decisions`, ...) instead of comparing
    its name. Report registries keyed by `Task.report` are lookups, not comparisons, and stay allowed."""
    from visiontune.task.kinds import TASKS

    names = set(TASKS)
    found = []
    for module, path in all_modules().items():
        if module.startswith("visiontune.task"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(_names_the_task(side, names) for side in [node.left, *node.comparators]):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "compare through the Task instead:\n" + "\n".join(found)


#: The files of a run folder (docs/architecture.md, "The run contract").
RUN_FILES = {"config.yaml", "serve.token", "plan.json", "profile.json", "split.json", "skipped.txt", "metrics.jsonl", "timings.json",
             "leakage.json", "predictions.npz", "auto.json", "adaptation.json", "folds.json", "interpretation.json",
             "report.html"}


def test_only_rundir_names_the_files_of_a_run_folder():
    """RunDir (runs.py) is the only code that reads or writes a run folder's files: no other module joins a
    run file's name onto a path (`run_dir / "split.json"`); they call RunDir's methods."""
    found = []
    for module, path in all_modules().items():
        if module == "visiontune.runs":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and node.right.value in RUN_FILES):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "read and write run files through RunDir:\n" + "\n".join(found)


def test_no_module_compares_method_names_outside_the_methods():
    """Which method trains, and how, is the registry's business (train/extra_methods.py, semi/, adapt/): code
    elsewhere asks the method (`method_named(name).objective`, `.baseline`) instead of comparing its name.
    ("none" is left out: it names several settings' off value too.)"""
    from visiontune.names import BUILTIN_METHODS

    names = {m for kind in BUILTIN_METHODS.values() for m in kind} - {"none"}
    found = []
    for module, path in all_modules().items():
        if module.startswith(("visiontune.semi", "visiontune.adapt", "visiontune.train.extra_methods", "visiontune.names")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                literal = [s for s in sides if isinstance(s, ast.Constant) and s.value in names]
                suffix = [s for s in sides if isinstance(s, ast.Call) and ast.unparse(s).split("(")[0].endswith("endswith")]
                if literal or suffix:
                    found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".endswith") and any(
                    isinstance(a, ast.Constant) and a.value in names for a in node.args):
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "ask the method instead:\n" + "\n".join(found)


def test_only_the_device_layer_asks_torch_about_gpus():
    """One module owns device choice, placement and precision (visiontune/device.py): a `torch.cuda` or
    `torch.backends.mps` call anywhere else is a GPU-only branch the CPU suite would not see."""
    found = []
    for name, path in all_modules().items():
        if name == "visiontune.device":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.cuda" in code or "torch.backends.mps" in code or "torch.backends.cudnn" in code:
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "GPU calls outside visiontune/device.py:\n" + "\n".join(found)
