"""Prompt templates: prompts/NAME.yaml with a `user` Jinja template and an optional `system` one.

The template's hash (of its file bytes) goes into every record and every request key, so editing a prompt
never silently mixes old and new traces.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from cot_distill.assets import REPO_ROOT
from cot_distill.errors import UserError

PROMPTS_DIR = REPO_ROOT / "prompts"
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@functools.lru_cache(maxsize=64)
def _compiled(source: str) -> jinja2.Template:
    """Compiling is ~0.5 ms, rendering a compiled template ~10 us: curate renders every kept prompt."""
    return _ENV.from_string(source)


class PromptTemplateError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    path: Path
    user: str
    system: str | None
    hash: str

    def render(self, problem: str, **fields: object) -> list[dict[str, str]]:
        """The chat messages for one problem."""
        values = {"problem": problem, **fields}
        messages = []
        if self.system:
            messages.append({"role": "system", "content": _compiled(self.system).render(**values)})
        messages.append({"role": "user", "content": _compiled(self.user).render(**values)})
        return messages


def resolve_template_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    named = PROMPTS_DIR / f"{name_or_path}.yaml"
    if named.exists():
        return named
    available = sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml"))
    raise PromptTemplateError(f"prompt template {name_or_path!r} not found (a file, or one of: {', '.join(available)})")


def load_template(name_or_path: str) -> PromptTemplate:
    path = resolve_template_path(name_or_path)
    raw = path.read_bytes()
    try:
        doc = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise PromptTemplateError(f"{path}: not valid YAML: {exc}") from None
    unknown = set(doc) - {"user", "system"}
    if unknown or not isinstance(doc.get("user"), str):
        raise PromptTemplateError(f"{path}: needs a 'user' template string and at most a 'system' one "
                                  f"(unknown keys: {sorted(unknown)})")
    for key in ("user", "system"):
        if doc.get(key) is not None:
            try:
                _ENV.parse(doc[key])
            except jinja2.TemplateSyntaxError as exc:
                raise PromptTemplateError(f"{path}: {key}: line {exc.lineno}: {exc.message}") from None
    return PromptTemplate(
        name=path.stem,
        path=path,
        user=doc["user"],
        system=doc.get("system"),
        hash=hashlib.sha256(raw).hexdigest()[:16],
    )
