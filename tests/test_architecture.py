"""The package's shape: no import cycles, one error base the CLI turns into one line, pydantic-only config, and
the public names that users import."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cot_distill
from cot_distill.cli import app
from cot_distill.errors import UserError

PACKAGE_DIR = Path(cot_distill.__file__).parent
REPO = PACKAGE_DIR.parent


def all_module_names() -> list[str]:
    # __main__ modules run their command on import.
    return sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="cot_distill.")
                  if not info.name.endswith(".__main__"))


def internal_imports(module: str) -> set[str]:
    """Every cot_distill module `module` imports, at the top or inside functions."""
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.startswith("cot_distill") and name != module)
    return found


def test_no_import_cycles_counting_imports_inside_functions():
    modules = set(all_module_names())
    graph = {module: {name for name in internal_imports(module) if name in modules} for module in modules}
    # A package's __init__ importing its own submodules is how a package re-exports, not a cycle.
    graph = {module: {name for name in edges if not name.startswith(module + ".")} for module, edges in graph.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
            if name not in state:
                visit(name, trail + [name])
        state[module] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])


def test_importing_the_config_imports_no_torch():
    code = ("import sys, cot_distill.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'vllm', 'datasets') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"


def test_public_names_stay_importable():
    from cot_distill.assets import build_tiny_model
    from cot_distill.evaluate import pass_at_k
    from cot_distill.grading import grade
    from cot_distill.kd import distillation_loss

    assert all(callable(name) for name in (build_tiny_model, pass_at_k, grade, distillation_loss))


def user_error_classes() -> list[type[UserError]]:
    for module in all_module_names():
        importlib.import_module(module)
    classes, todo = [], [UserError]
    while todo:
        for subclass in todo.pop().__subclasses__():
            if subclass.__module__.startswith("cot_distill"):
                classes.append(subclass)
                todo.append(subclass)
    return sorted(set(classes), key=lambda cls: cls.__qualname__)


def test_every_error_class_a_user_can_fix_has_the_one_base():
    """Error classes the package defines are UserErrors, except the teacher client's internal signals, which
    generate turns into records or a GenerateError."""
    internal = {"TransientError", "PermanentError", "AllEndpointsDown"}
    for module in all_module_names():
        for name, value in vars(importlib.import_module(module)).items():
            if (isinstance(value, type) and issubclass(value, Exception) and value.__module__ == module
                    and name not in internal):
                assert issubclass(value, UserError), f"{module}.{name} does not derive from UserError"


@pytest.mark.parametrize("error_class", user_error_classes(), ids=lambda cls: cls.__name__)
def test_each_user_error_reaches_the_user_as_one_line_without_a_traceback(monkeypatch, tmp_path, error_class):
    def failing_load(path, overrides):
        raise error_class(f"{path}:3: something the user can fix ({error_class.__name__})")

    monkeypatch.setattr("cot_distill.config.load_recipe", failing_load)
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'r.yaml'}:3: something the user can fix "
                                                  f"({error_class.__name__})"]


def write_recipe(tmp_path: Path, **sections) -> Path:
    doc = {"teacher": {"model": "m", "base_urls": ["http://127.0.0.1:9/v1"]},
           "data": {"prompts": str(tmp_path / "prompts.jsonl")},
           "generate": {"output_dir": str(tmp_path / "gen")},
           "curate": {"output_dir": str(tmp_path / "cur")}, **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


@pytest.mark.parametrize("case", ["unknown_key", "missing_prompts", "bad_prompt_row", "unknown_template",
                                  "curate_before_generate", "train_without_data"])
def test_real_user_mistakes_end_in_one_error_message(tmp_path, case):
    """Real mistakes through the real stages (no stand-ins): exit 2, an `error:` message, no traceback."""
    (tmp_path / "prompts.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    command = "generate"
    if case == "unknown_key":
        recipe = write_recipe(tmp_path, generate={"concurency": 3})
    elif case == "missing_prompts":
        recipe = write_recipe(tmp_path)
        (tmp_path / "prompts.jsonl").unlink()
    elif case == "bad_prompt_row":
        (tmp_path / "prompts.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n{"question": "x"}\n')
        recipe = write_recipe(tmp_path)
    elif case == "unknown_template":
        recipe = write_recipe(tmp_path, generate={"prompt_template": "no-such-template"})
    elif case == "curate_before_generate":
        recipe, command = write_recipe(tmp_path), "curate"
    else:
        recipe = write_recipe(tmp_path, train={"student": "s", "output_dir": str(tmp_path / "t"),
                                               "dataset": str(tmp_path / "missing.jsonl")})
        command = "train"
    result = CliRunner().invoke(app, [command, str(recipe)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
