"""What every section of the recipe shares: the strict base model, `--set` overrides, and errors that name the
YAML file, line and dotted path (`recipes/x.yaml:12: generate.concurrency: Input should be a valid integer`).

Only pydantic and yaml here: the recipe validates in milliseconds and `import cot_distill.config` pulls in no torch.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cot_distill.errors import UserError


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a recipe must never be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RecipeError(UserError, ValueError):
    """A recipe that cannot be read or does not validate; the message names the file, line and key."""


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.path=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected dotted.path=value")
    path, raw_value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = doc
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {assignment!r}: {key} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw_value) if raw_value.strip() else ""


def key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every mapping key's path in the YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines[path] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[prefix + (index,)] = item.start_mark.line + 1
            lines.update(key_lines(item, prefix + (index,)))
    return lines


def format_errors(exc: ValidationError, source: str, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    messages = []
    for error in exc.errors():
        loc, message = tuple(error["loc"]), error["msg"]
        # A model-level check (e.g. the ablations') names the key it is about at the start of its message.
        named = re.match(r"Value error, ([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+): (.*)", message, re.DOTALL)
        if not loc and named:
            loc = tuple(int(part) if part.isdigit() else part for part in named.group(1).split("."))
            message = named.group(2)
        dotted = ".".join(str(part) for part in loc) or "(top level)"
        where = source
        if loc in overridden:
            where = "--set"
        else:
            for depth in range(len(loc), 0, -1):  # the nearest enclosing key that has a line
                if loc[:depth] in lines:
                    where = f"{source}:{lines[loc[:depth]]}"
                    break
        messages.append(f"{where}: {dotted}: {message}")
    return "invalid recipe:\n  " + "\n  ".join(messages)
