"""The recipe and its sections: pydantic only, so a recipe validates in milliseconds and importing this package
imports no torch (tests/test_architecture.py checks it).

    base      the strict base model, `--set` overrides, file:line errors
    recipe    Recipe, load_recipe, recipe_snapshot
    generate  teacher, launch, data, sampling (shared with eval), generate
    curate    the curate section and its filters
    train     the train section (sft, lora, kd, init_from)
    eval      the eval section and `cot-distill eval`'s options
    push      the push section (hub repos for `cot-distill push`)
    quantize  the quantize section (llm-compressor scheme, calibration rows)
"""

from cot_distill.config.base import RecipeError, Strict, apply_override
from cot_distill.config.curate import CorrectnessFilter, CurateSection
from cot_distill.config.eval import EvalError, EvalSection, LocalBenchmark, eval_settings
from cot_distill.config.generate import (
                                         BudgetSection,
                                         DataSection,
                                         FieldMap,
                                         GenerateSection,
                                         LaunchSection,
                                         RateLimitSection,
                                         SamplingSection,
                                         TeacherEntry,
                                         TeacherSection,
                                         UntilVerifiedSection,
)
from cot_distill.config.push import PushSection
from cot_distill.config.quantize import QuantizeSection
from cot_distill.config.recipe import Recipe, load_recipe, recipe_snapshot
from cot_distill.config.train import InitFrom, KDSection, LoraSection, TrainSection

__all__ = [
    "BudgetSection", "CorrectnessFilter", "CurateSection", "DataSection", "EvalError", "EvalSection", "FieldMap", "GenerateSection", "InitFrom",
    "KDSection", "LaunchSection", "LocalBenchmark", "LoraSection", "PushSection", "QuantizeSection", "RateLimitSection", "Recipe", "RecipeError",
    "SamplingSection",
    "Strict", "TeacherEntry", "TeacherSection", "TrainSection", "UntilVerifiedSection", "apply_override", "eval_settings", "load_recipe",
    "recipe_snapshot",
]
