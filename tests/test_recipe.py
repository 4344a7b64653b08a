from pathlib import Path

import pytest

from cot_distill.config import RecipeError, load_recipe
from cot_distill.prompts import PromptTemplateError, load_template

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

MINIMAL = """\
teacher:
  model: t
data:
  prompts: data/demo/prompts.jsonl
generate:
  concurrency: 4
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    load_template(recipe.generate.prompt_template)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "demo-cpu.yaml" in names and "r1-distill-gpu.yaml" in names


def test_gpu_recipe_is_shaped_like_r1_generation():
    recipe = load_recipe(REPO / "recipes" / "r1-distill-gpu.yaml")
    sampling = recipe.generate.sampling
    assert (sampling.temperature, sampling.top_p, recipe.generate.samples_per_prompt) == (0.6, 0.95, 4)
    assert 16384 <= sampling.max_tokens <= 32768


def test_unknown_key_names_path_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "  concurency: 8\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert f"{path}:7: generate.concurency" in message and "Extra inputs" in message


def test_wrong_type_names_path_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("concurrency: 4", "concurrency: many"))
    with pytest.raises(RecipeError, match=rf"{path}:6: generate.concurrency: Input should be a valid integer"):
        load_recipe(path)


def test_nested_unknown_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "  sampling:\n    temprature: 0.5\n")
    with pytest.raises(RecipeError, match=r":8: generate.sampling.temprature"):
        load_recipe(path)


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path, ["generate.concurrency=64", "generate.sampling.stop=[a, b]",
                                "teacher.base_urls=[http://x:1/v1]"])
    assert recipe.generate.concurrency == 64
    assert recipe.generate.sampling.stop == ["a", "b"]
    assert recipe.teacher.base_urls == ["http://x:1/v1"]


def test_bad_override_is_attributed_to_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    with pytest.raises(RecipeError, match=r"--set: generate.samples_per_prompt"):
        load_recipe(path, ["generate.samples_per_prompt=0"])
    with pytest.raises(RecipeError, match="expected dotted.path=value"):
        load_recipe(path, ["generate.concurrency"])


def test_bad_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_prompt_templates_render_and_hash():
    nosys = load_template("r1-math-nosys")
    messages = nosys.render("What is 2+2?")
    assert messages == [{"role": "user", "content": "What is 2+2?\nPlease reason step by step, and put your "
                                                    "final answer within \\boxed{}."}]
    sys_variant = load_template("r1-math")
    assert [m["role"] for m in sys_variant.render("x")] == ["system", "user"]
    assert nosys.hash != sys_variant.hash and len(nosys.hash) == 16


def test_unknown_template_lists_available():
    with pytest.raises(PromptTemplateError, match="r1-math-nosys"):
        load_template("no-such-template")


WITH_TRAIN = MINIMAL + """\
train:
  init_from: {model: smollm2-135m, every: 2}
  output_dir: runs/t/train
  sft: {learning_rate: 0.0003}
"""


def test_ablation_is_the_train_section_with_its_keys_replaced(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(WITH_TRAIN + "ablations:\n  lr:\n    output_dir: runs/t/train-lr\n    sft: {learning_rate: 0.001}\n")
    recipe = load_recipe(path)
    variant = recipe.ablation_train("lr")
    assert variant.output_dir == "runs/t/train-lr" and variant.sft == {"learning_rate": 0.001}
    assert variant.init_from == recipe.train.init_from  # everything not named is the main student's


@pytest.mark.parametrize("ablation, message", [
    ("    methd: kd\n    output_dir: runs/t/x\n", "r.yaml:13: ablations.x.methd: Extra inputs are not permitted"),
    ("    sft: {}\n", "r.yaml:12: ablations.x.output_dir: set one of its own (it would overwrite runs/t/train)"),
])
def test_bad_ablation_names_its_key_and_line(tmp_path, ablation, message):
    path = tmp_path / "r.yaml"
    path.write_text(WITH_TRAIN + "ablations:\n  x:\n" + ablation)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert message in str(error.value)


def test_ablations_need_a_train_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "ablations:\n  x: {output_dir: y}\n")
    with pytest.raises(RecipeError, match="ablations and chain vary the train section"):
        load_recipe(path)


def test_report_goes_next_to_the_eval_folder_unless_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "eval: {output_dir: runs/x/eval}\n")
    assert load_recipe(path).report_path() == Path("runs/x/report.json")
    assert load_recipe(path, ["report=out/r.json"]).report_path() == Path("out/r.json")


def test_make_demo_kd_override_builds_the_kd_ablation():
    """`make demo-kd` adds the ablation with --set: it must validate and differ from the main student only in
    its method and folder."""
    import shlex

    line = next(line for line in (REPO / "Makefile").read_text().splitlines() if "ablations=" in line)
    override = shlex.split(line)[shlex.split(line).index("--set") + 1]
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", [override])
    kd = recipe.ablation_train("kd")
    assert kd.method == "kd" and kd.kd.teacher == recipe.train.init_from.model
    assert kd.init_from == recipe.train.init_from and kd.sft == recipe.train.sft
    assert kd.output_dir == "runs/demo/train-kd"


def make_command(target: str) -> list[str]:
    """The `cot-distill ...` command a make target runs, its variables expanded by make itself."""
    import shlex
    import subprocess

    lines = subprocess.run(["make", "-n", "-s", target], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    # the last one: a target may first run `make demo` (whose command make -n prints too)
    return shlex.split([line for line in lines if "cot-distill run" in line][-1])


def overrides(command: list[str]) -> list[str]:
    return [command[index + 1] for index, word in enumerate(command) if word == "--set"]


def test_make_demo_kd_recorded_and_demo_opd_build_issue_18s_ablations():
    from cot_distill.pipeline import trained_students, with_served_teacher

    recorded = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides(make_command("demo-kd-recorded")))
    assert recorded.generate.logprobs == 20 and set(recorded.ablations) == {"kd", "kd_recorded"}
    assert recorded.ablation_train("kd_recorded").kd.recorded
    assert not recorded.ablation_train("kd").kd.recorded
    folders = [recorded.generate.output_dir, recorded.curate.output_dir, recorded.eval.output_dir,
               str(recorded.report), *(train.output_dir for train in trained_students(recorded).values())]
    assert all(folder.startswith("runs/demo-recorded/") for folder in folders), folders
    # demo-opd builds on make demo's run: its stages are the demo's, plus the opd student
    demo = load_recipe(REPO / "recipes" / "demo-cpu.yaml")
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides(make_command("demo-opd")))
    assert set(recipe.ablations) == {"opd"}
    assert recipe.model_dump(exclude={"ablations"}) == demo.model_dump(exclude={"ablations"})
    opd = recipe.ablation_train("opd")
    assert opd.method == "on_policy" and opd.init_from is None and opd.student == recipe.train.output_dir
    assert opd.on_policy.served.base_url is None  # the recipe's teacher, served by `run` for the training

    class Slot:  # stands in for teachers.serve.ServerSlot: what the pipeline asks it to launch
        def get(self, launch, name, log_path):
            self.asked = (launch, name)
            return type("Server", (), {"base_urls": ["http://127.0.0.1:1234/v1"]})()

    slot = Slot()
    served = with_served_teacher(recipe, opd, slot).on_policy.served
    assert (served.base_url, served.model) == ("http://127.0.0.1:1234/v1", recipe.teacher.model)
    assert slot.asked == (recipe.teacher.launch, recipe.teacher.model)
    assert with_served_teacher(recipe, recipe.train, slot) is recipe.train


def test_make_demo_prune_adds_a_student_whose_layers_are_measured():
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides(make_command("demo-prune")))
    auto = recipe.ablation_train("auto_layers")
    assert auto.init_from.keep == "auto" and auto.init_from.layers == len(recipe.train.init_from.keep_layers)
    assert auto.sft == recipe.train.sft and auto.output_dir == "runs/demo/train-auto-layers"


def test_make_demo_chain_reuses_the_demo_student_as_assistant_and_trains_a_ten_layer_student_both_ways():
    from cot_distill.pipeline import teacher_recipes, trained_students

    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides(make_command("demo-chain")))
    students = trained_students(recipe)
    assert list(students) == ["student_assistant", "student_after", "student_direct"]
    assert students["student_assistant"] == recipe.train  # the demo's own student: a finished `make demo` is reused
    assert len(students["student_after"].init_from.keep_layers) == 10
    assert students["student_direct"].init_from == students["student_after"].init_from
    learns_from = teacher_recipes(recipe)["student_after"]
    assert learns_from.teacher.launch.model_path == "runs/demo/train"
    assert learns_from.generate.output_dir.startswith("runs/demo-chain/")
    assert recipe.eval.output_dir.startswith("runs/demo-chain/") and recipe.quantize is None


def make_words(name: str) -> list[str]:
    """A make variable's words as the target's shell sees them (its quotes applied), one per line."""
    import subprocess

    return subprocess.run(["make", "-s", "--eval", f"print-words: ; @printf '%s\\n' $({name})", "print-words"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()


def test_make_demo_teachers_builds_two_teachers_and_every_across_teachers_policy():
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides(make_command("demo-teachers")))
    assert [teacher.name for teacher in recipe.teachers] == ["teacher", "assistant"]
    assert recipe.teacher.model == "smollm2-135m" and recipe.teachers[1].launch.model_path == "runs/demo/train"
    assert all(gen.samples_per_prompt == 4 for _, gen in recipe.teacher_jobs())
    shortest = recipe.ablation_train("shortest")
    assert shortest.dataset == "runs/demo-teachers/curate-shortest_verified/dataset"
    policies = make_words("POLICIES")
    assert len(policies) == 4
    for policy in policies:  # each curate of the loop validates
        curated = load_recipe(REPO / "recipes" / "demo-cpu.yaml",
                              [*overrides(make_command("demo-teachers")), f"curate.select.across_teachers={policy}"])
        assert curated.curate.select.across_teachers != "all"


def test_make_demo_quant_adds_the_int8_student_to_the_demo():
    from cot_distill.config.quantize import quantized_dir

    plain = load_recipe(REPO / "recipes" / "demo-cpu.yaml")
    assert plain.quantize is None  # make demo itself stays within 20 minutes (README)
    recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides(make_command("demo-quant")))
    assert recipe.quantize.scheme == "w8a8-int8" and recipe.quantize.calibration_rows == 64
    assert quantized_dir(recipe.quantize, recipe.train.output_dir) == Path("runs/demo/train-quantized")
    assert recipe.model_copy(update={"quantize": None}) == plain  # nothing else changes: every stage is reused


LAUNCHED = """\
teacher:
  model: t
  launch: {model_path: smollm2-135m%s}
data:
  prompts: data/demo/prompts.jsonl
"""


@pytest.mark.parametrize("extra, message", [
    ("generate: {logprobs: 50}\n", "generate.logprobs: 50 log-probabilities per token, and the server teacher.launch "
                                   "starts returns at most 20"),
    ("train: {output_dir: o, student: s, method: on_policy, on_policy: {served: {top_k: 32}}}\n",
     'train.on_policy.served.top_k: 32 .* add "--max-logprobs", "32" to teacher.launch.extra_args'),
    ("train: {output_dir: o, student: s}\n"  # each student the run trains, not only the main one
     "ablations: {op: {output_dir: o2, method: on_policy, on_policy: {served: {top_k: 32}}}}\n",
     "ablations.op.on_policy.served.top_k: 32"),
    ("train: {output_dir: o, student: s}\n"  # served from the stage before, launched with teacher.launch
     "chain: {stages: [{name: a}, {name: b, train: {method: on_policy, on_policy: {served: {top_k: 32}}}}]}\n",
     "chain.stages.1.train.on_policy.served.top_k: 32"),
])
def test_more_logprobs_than_a_launched_server_returns_is_refused_before_it_starts(tmp_path, extra, message):
    path = tmp_path / "r.yaml"
    path.write_text(LAUNCHED % "" + extra)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    for allowed in ('"--max-logprobs", "64"', '"--max_logprobs=64"', '"--max-logprobs", "-1"'):  # -1: no limit
        path.write_text(LAUNCHED % f", extra_args: [{allowed}]" + extra)
        load_recipe(path)
    path.write_text(LAUNCHED.replace("  launch: {model_path: smollm2-135m%s}\n", "") + extra)
    if "chain" not in extra:
        load_recipe(path)  # a server the run does not start: its limit is its own (a 400 names it)
    else:  # the run starts the stage before it always, with vLLM's defaults when the teacher has no launch settings
        with pytest.raises(RecipeError, match="stage before it is served by a vLLM that returns at most 20"):
            load_recipe(path)
