"""The `push` section of a recipe: which Hugging Face Hub repos `cot-distill push` uploads the curated dataset and
the students to. Only pydantic here, so a recipe validates in milliseconds.

    push:
      dataset_repo: my-org/demo-traces        # curate.output_dir's dataset, with its card
      student_repo: my-org/demo-student       # train.output_dir's final model, with its card
      ablation_repos: {kd: my-org/demo-kd}    # ablations.<name>'s student, likewise
      quantized_repo: my-org/demo-student-q4  # quantized_dir (default TRAIN.OUTPUT_DIR-quantized), when finished
      private: true
      token_env: HF_TOKEN                     # the NAME of the variable holding the token; the token is never stored

Repos left unset are not pushed. `dry_run: true` (or `cot-distill push --dry-run`) writes the cards and the upload
plan under output_dir and calls nothing on the hub.
"""

from __future__ import annotations

import re

from pydantic import field_validator

from cot_distill.config.base import Strict

# A hub repo id: "name" (the token's own namespace) or "owner/name".
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOKS_LIKE_A_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")  # user access tokens: hf_ and 34 letters and digits


def _check_repo_id(value: str, key: str) -> str:
    if not _REPO_ID.fullmatch(value) or ".." in value or value.endswith((".git", ".")):
        raise ValueError(f"push.{key}: {value!r} is not a hub repo id (owner/name)")
    return value


class PushSection(Strict):
    dataset_repo: str | None = None
    student_repo: str | None = None  # the main student (train.output_dir)
    ablation_repos: dict[str, str] = {}  # ablation name -> repo, for the recipe's `ablations`
    quantized_repo: str | None = None
    quantized_dir: str | None = None  # default: TRAIN.OUTPUT_DIR-quantized
    # Applies when a repo is created: the hub keeps an existing repo's visibility.
    private: bool = True
    token_env: str = "HF_TOKEN"
    revision: str | None = None  # a branch to push to (created when missing); None: the default branch
    commit_message: str | None = None  # None: "cot-distill push: RECIPE NAME"
    output_dir: str = "runs/push"  # the cards and plan.json, on every push (a dry run writes nothing else)
    dry_run: bool = False

    @field_validator("dataset_repo", "student_repo", "quantized_repo")
    @classmethod
    def _repo_ids(cls, value: str | None, info) -> str | None:
        return None if value is None else _check_repo_id(value, info.field_name)

    @field_validator("ablation_repos")
    @classmethod
    def _ablation_repo_ids(cls, repos: dict[str, str]) -> dict[str, str]:
        return {name: _check_repo_id(repo, f"ablation_repos.{name}") for name, repo in repos.items()}

    @field_validator("token_env")
    @classmethod
    def _names_a_variable(cls, value: str) -> str:
        # A pasted token here would land in every manifest's recipe snapshot: refuse anything but a variable name.
        if _LOOKS_LIKE_A_TOKEN.fullmatch(value) or not _ENV_NAME.fullmatch(value):
            raise ValueError("push.token_env is the name of an environment variable (e.g. HF_TOKEN), not the token")
        return value
