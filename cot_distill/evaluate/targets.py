"""Which model eval runs and how it is served: a recipe teacher, a local folder or a running endpoint, turned into
ONE launched vLLM server for all benchmarks where we run the model ourselves (`serving`), and `prepare_eval`,
which turns `cot-distill eval`'s arguments into (settings, target).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from cot_distill.config import LaunchSection, TeacherSection
from cot_distill.config.eval import EvalError, EvalSection, eval_settings
from cot_distill.evaluate.footprint import PeakMemory

PROMPT_TOKEN_ALLOWANCE = 2048  # context for the prompt on top of max_tokens, for servers we launch


def engine_kwargs_as_server_args(engine_kwargs: dict[str, Any]) -> list[str]:
    """vllm.LLM(**kwargs) options as `vllm serve` flags: tensor_parallel_size=2 -> --tensor-parallel-size 2."""
    args = []
    for key, value in engine_kwargs.items():
        if key in ("max_model_len", "dtype"):
            continue  # set through LaunchSection
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return args


def eval_context(settings: EvalSection) -> int:
    """The context (max_model_len) a server we launch for this eval needs."""
    return settings.max_model_len or settings.sampling.max_tokens + PROMPT_TOKEN_ALLOWANCE


def as_served(target: TeacherSection, settings: EvalSection) -> TeacherSection:
    """Every model we run ourselves becomes one launched server: the in-process backend would reload the model
    for every benchmark (and keep the old engine's GPU memory until it is collected)."""
    context = eval_context(settings)
    if target.backend == "vllm":
        kwargs = target.engine_kwargs
        launch = LaunchSection(model_path=target.model, dtype=kwargs.get("dtype", "auto"), max_model_len=context,
                               extra_args=engine_kwargs_as_server_args(kwargs))
        return target.model_copy(update={"backend": "openai", "launch": launch, "engine_kwargs": {}})
    if target.launch is not None:
        return target.model_copy(update={"launch": target.launch.model_copy(update={"max_model_len": context})})
    return target


def target_from_model(model_path: str, served_name: str | None = None) -> TeacherSection:
    """A local model folder (or 'smollm2-135m'), launched as a local vLLM server."""
    name = served_name or Path(model_path).name
    return TeacherSection(backend="openai", model=name, launch=LaunchSection(model_path=model_path))


def target_from_endpoint(base_url: str, served_name: str | None = None,
                         api_key_env: str | None = None) -> TeacherSection:
    """A running OpenAI-compatible server; the model name is asked from /models when not given."""
    base_url = base_url.rstrip("/")
    name = served_name or served_model_name(base_url, api_key_env)
    return TeacherSection(backend="openai", model=name, base_urls=[base_url], api_key_env=api_key_env)


def served_model_name(base_url: str, api_key_env: str | None = None) -> str:
    import os
    import urllib.request

    request = urllib.request.Request(f"{base_url}/models")
    if api_key_env and os.environ.get(api_key_env):
        request.add_header("Authorization", f"Bearer {os.environ[api_key_env]}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            names = [model["id"] for model in json.load(response).get("data", [])]
    except Exception as exc:  # noqa: BLE001 - any failure means the endpoint cannot be used
        raise EvalError(f"cannot list the models of {base_url} ({exc}); is the server up?") from None
    if len(names) != 1:
        raise EvalError(f"{base_url} serves {names}; choose one with --served-name")
    return names[0]


@contextlib.contextmanager
def serving(target: TeacherSection, out_dir: Path,
            slot=None) -> Iterator[tuple[TeacherSection, PeakMemory | None, Any]]:
    """(the target as an endpoint, a memory watcher or None, the launched server or None): one server for all
    benchmarks when we launch it; in `slot` (a teachers.serve.ServerSlot) when given, which keeps it running."""
    if target.launch is None:
        yield target, None, None
        return
    from cot_distill.teachers.serve import running_server

    with running_server(target.launch, target.model, out_dir / "vllm-server.log", slot) as server:
        with PeakMemory(server.pid) as memory:  # with launch.replicas > 1: the first replica's
            yield target.model_copy(update={"launch": None, "base_urls": server.base_urls}), memory, server


def prepare_eval(recipe_path: str | Path | None = None, *, model: str | None = None, endpoint: str | None = None,
                 served_name: str | None = None, api_key_env: str | None = None, overrides: list[str] | None = None,
                 **options: Any) -> tuple[EvalSection, TeacherSection]:
    """What `cot-distill eval` runs: the eval settings and the model, from a recipe and/or --model / --endpoint.
    options: benchmarks, samples, max_tokens, limit, source, output_dir (None keeps the recipe's value)."""
    from cot_distill.config import load_recipe

    if model and endpoint:
        raise EvalError("give --model or --endpoint, not both")
    recipe = load_recipe(recipe_path, overrides or []) if recipe_path else None
    settings = eval_settings(recipe.eval if recipe else None, [] if recipe else overrides or [], **options)
    if endpoint:
        return settings, target_from_endpoint(endpoint, served_name, api_key_env)
    if model or settings.model:
        return settings, target_from_model(model or settings.model, served_name)
    if recipe is None:
        raise EvalError("nothing to evaluate: give a RECIPE (its teacher, or eval.model), --model PATH or "
                        "--endpoint URL")
    return settings, recipe.teacher


def refuse_seed_on_cpu(target: TeacherSection, settings: EvalSection, out_dir: Path) -> None:
    """The check run_generate makes before launching a server, made here because we launch it ourselves."""
    if target.launch is not None:
        from cot_distill.teachers.serve import check_cpu_sampling

        check_cpu_sampling(settings.sampling)
