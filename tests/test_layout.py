"""The project's layout rules: no import cycle among its own modules, and modules and functions of a size one
can read (modules at most ~400 lines, functions at most ~60), in the engine, the page (studio/) and the faces."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("lora_core", "studio")
FACES = ("train_lora.py", "webui.py")
MAX_MODULE_LINES = 420  # "about 400": config.py, mostly its table of fields, is at 418
MAX_FUNCTION_LINES = 60


def own_modules() -> dict[str, Path]:
    """Module name -> file, for the project's packages and faces."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    modules.update({face.removesuffix(".py"): ROOT / face for face in FACES})
    return modules


def type_only(tree: ast.AST) -> set[ast.AST]:
    """The nodes under `if TYPE_CHECKING:`: imports for annotations, which never run, so they make no cycle."""
    guarded = [node for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
               and node.test.id == "TYPE_CHECKING"]
    return {inner for node in guarded for statement in node.body for inner in ast.walk(statement)}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project's modules `path` imports anywhere in it (function-level imports included; those under
    `if TYPE_CHECKING:` only where annotations need them, so not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = type_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:  # `a.b.c` -> the deepest module of ours it names
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == 1:
                return stack[stack.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_of_the_projects_modules_has_no_cycle():
    modules = own_modules()
    graph = {name: imports_of(path, name, set(modules)) for name, path in modules.items()}
    assert graph["lora_core.training"] >= {"lora_core.plan", "lora_core.setup"}  # the parser sees imports
    assert "lora_core.config" in graph["lora_core.cli"]  # function-level ones too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_an_import_for_annotations_only_is_no_edge(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lora_core.models\n"
                    "import lora_core.config\n", encoding="utf-8")
    assert imports_of(path, "probe", {"lora_core.models", "lora_core.config"}) == {"lora_core.config"}


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(own_modules().values()):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most "
                                    f"{MAX_FUNCTION_LINES})")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def family_name_tests(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing something with a family's name (`family == "sdxl"`, `name in ("sd1", "sd2")`)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = [c for operand in operands for c in ast.walk(operand) if isinstance(c, ast.Constant)]
        if any(isinstance(c.value, str) and c.value in names for c in constants):
            lines.append(node.lineno)
    return lines


def test_no_module_outside_the_families_tests_a_familys_name():
    """What differs between families is asked of the family (docs/families.md): a module that tests a family's
    name instead is one a new family would have to touch."""
    from lora_core import families

    names = set(families.names())
    found = []
    for name, path in own_modules().items():
        if name.startswith("lora_core.families"):
            continue
        lines = family_name_tests(ast.parse(path.read_text(encoding="utf-8")), names)
        found += [f"{path.relative_to(ROOT)}:{line}" for line in lines]
    assert not found, f"family names tested outside lora_core/families/: {found}"


def test_a_family_name_test_is_found():
    names = {"sdxl", "flux"}
    assert family_name_tests(ast.parse('if spec.family == "sdxl": pass'), names) == [1]
    assert family_name_tests(ast.parse('x = kind in ("sd1", "flux")'), names) == [1]
    assert family_name_tests(ast.parse('families.get("sdxl")\nif a == "sd2": pass'), names) == []


ENGINE_LIBRARIES = ("torch", "diffusers", "peft", "accelerate", "transformers")


def engine_library_imports(path: Path) -> list[str]:
    """The heavy engine libraries a file imports anywhere in it (annotations-only imports aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = type_only(tree)
    found = []
    for node in ast.walk(tree):
        if node in skipped:
            continue
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in ENGINE_LIBRARIES]
    return found


def test_only_the_engine_imports_torch_and_its_libraries():
    """The page side (studio/, webui.py) starts jobs and reads what they write: torch, diffusers, peft,
    accelerate and transformers are the engine's (lora_core/), so the server never holds a device."""
    page_side = [*sorted((ROOT / "studio").rglob("*.py")), ROOT / "webui.py"]
    assert not [found for path in page_side for found in engine_library_imports(path)]


def test_an_engine_library_import_is_found(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from diffusers import X\n    import torch.nn\n", encoding="utf-8")
    assert engine_library_imports(module) == ["m.py:2 diffusers", "m.py:3 torch.nn"]
