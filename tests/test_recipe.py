"""Recipe validation: YAML + overrides -> pydantic model, and `softprompt validate` on good and bad recipes.

Nothing here loads a model: these tests are fast and import no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, NO_HEAVY_IMPORTS, REPO

from softprompt_cli.config.load import RecipeError, apply_overrides, load_recipe, parse_recipe, read_yaml
from softprompt_cli.errors import UserError
from softprompt_cli.methods.base import registry

MRPC_RECIPE = REPO / "recipes" / "mrpc_prompt_tuning.yaml"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minimal(method: dict | None = None, **sections) -> dict:
    """A small valid recipe as a dict (no file, no data read)."""
    data = {
        "model": {"name_or_path": MINILM},
        "data": {"glue_task": "mrpc", "dir": str(GLUE_DIR)},
        "method": method or {"name": "prompt_tuning"},
    }
    data.update(sections)
    return data


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert len(info.value.problems) >= 1
    assert f"has {len(info.value.problems)} problem(s)" in str(info.value)
    return info.value.problems


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- shipped recipes


def test_recipes_folder_has_recipes():
    assert RECIPES, "recipes/*.yaml is empty"
    assert MRPC_RECIPE in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.method.name in registry()
    assert recipe.output.dir == str(Path("runs") / path.stem)
    assert recipe.main_metric in recipe.metrics
    # The dumped recipe (as saved next to checkpoints) parses back to the same recipe.
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_mrpc_recipe_contents():
    recipe = load_recipe(MRPC_RECIPE)
    assert recipe.model.name_or_path == MINILM
    assert recipe.data.glue_task == "mrpc"
    assert recipe.method.name == "prompt_tuning"
    assert recipe.metrics == ["accuracy", "f1"]
    assert recipe.main_metric == "accuracy"


def test_explicit_output_dir_is_kept():
    recipe = load_recipe(MRPC_RECIPE, ["output.dir=/tmp/somewhere"])
    assert recipe.output.dir == "/tmp/somewhere"


# --------------------------------------------------------------------------------------------- schema problems


def test_unknown_key_suggests_the_close_one():
    assert problems_of(minimal(training={"lrr": 0.1})) == ["training.lrr: unknown key (did you mean 'lr'?)"]


def test_unknown_top_level_key_suggests_section():
    assert problems_of({**minimal(), "trainig": {"lr": 0.1}}) == ["trainig: unknown key (did you mean 'training'?)"]


def test_unknown_key_without_close_match_lists_allowed_keys():
    (problem,) = problems_of(minimal(output={"zzzzzz": 1}))
    assert problem.startswith("output.zzzzzz: unknown key (allowed: ")
    for field in ("dir", "save_tokenizer", "overwrite"):
        assert field in problem


def test_method_key_typo_suggests_common_option():
    method = {"name": "prompt_tuning", "num_virtual_tokenz": 4}
    assert problems_of(minimal(method)) == [
        "method.num_virtual_tokenz: unknown key (did you mean 'num_virtual_tokens'?)"
    ]


def test_method_key_typo_suggests_the_methods_own_option():
    # 'encoder' exists only on p_tuning: the suggestion must come from the chosen method's fields.
    method = {"name": "p_tuning", "encodr": "mlp"}
    assert problems_of(minimal(method)) == ["method.encodr: unknown key (did you mean 'encoder'?)"]


def test_option_of_another_method_is_unknown():
    (problem,) = problems_of(minimal({"name": "prompt_tuning", "encoder": "mlp"}))
    assert problem.startswith("method.encoder: unknown key")


def test_wrong_type():
    (problem,) = problems_of(minimal(training={"lr": "abc"}))
    assert problem.startswith("training.lr: ")
    assert "number" in problem and "'abc'" in problem


def test_wrong_type_via_override():
    with pytest.raises(RecipeError) as info:
        load_recipe(MRPC_RECIPE, ["training.lr=abc"])
    (problem,) = info.value.problems
    assert problem.startswith("training.lr: ") and "'abc'" in problem
    assert str(MRPC_RECIPE) in str(info.value)


def test_out_of_range_value():
    (problem,) = problems_of(minimal(training={"batch_size": 0}))
    assert problem.startswith("training.batch_size: ") and "0" in problem


def test_literal_error_names_path_and_choices():
    problems = problems_of(minimal({"name": "p_tuning", "encoder": "gru"}))
    assert problems == ["method.encoder: 'gru' is not one of mlp, lstm"]


def test_literal_error_in_plain_section():
    assert problems_of(minimal(model={"name_or_path": MINILM, "dtype": "float8"})) == [
        "model.dtype: 'float8' is not one of float32, bfloat16, float16"
    ]


def test_unknown_method_name():
    (problem,) = problems_of(minimal({"name": "lora"}))
    assert problem.startswith("method.name: 'lora' is not one of ")
    for name in registry():
        assert name in problem


def test_method_without_name():
    (problem,) = problems_of(minimal({"num_virtual_tokens": 4}))
    assert problem.startswith("method.name: required")


def test_missing_method_section():
    data = minimal()
    del data["method"]
    assert problems_of(data) == ["method: required, but missing"]


def test_missing_model_name_or_path():
    assert problems_of(minimal(model={"dtype": "float32"})) == ["model.name_or_path: required, but missing"]


def test_data_section_rules():
    both = problems_of(minimal(data={"glue_task": "mrpc", "dataset": "x/y"}))
    assert both == ["data: give exactly one data source: glue_task, dataset or files (got glue_task, dataset)"]
    (unknown_task,) = problems_of(minimal(data={"glue_task": "mrcp"}))
    assert unknown_task.startswith("data: glue_task 'mrcp' is not one of mrpc")
    (no_fields,) = problems_of(minimal(data={"files": {"train": "a.csv", "validation": "b.csv"}}))
    assert "text_fields is required" in no_fields
    (no_split,) = problems_of(minimal(data={"files": {"train": "a.csv"}, "text_fields": ["t"]}))
    assert "validation" in no_split


def test_task_metric_rules():
    (unknown,) = problems_of(minimal(task={"metrics": ["accuracy", "bleu"]}))
    assert unknown.startswith("task: unknown metric(s) bleu")
    (main,) = problems_of(minimal(task={"metrics": ["accuracy"], "main_metric": "f1"}))
    assert "main_metric 'f1' is not in metrics" in main


def test_several_problems_reported_at_once():
    data = minimal(
        {"name": "p_tuning", "encoder": "gru", "encodr_hidden_size": 8},
        model={"dtype": "float8"},
        training={"lrr": 0.1, "epochs": "many"},
    )
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, source="recipe 'x.yaml'")
    problems = info.value.problems
    assert len(problems) == 6, problems
    message = str(info.value)
    assert message.startswith("recipe 'x.yaml' has 6 problem(s):\n")
    assert message.count("\n  - ") == 6
    for expected in (
        "model.name_or_path: required, but missing",
        "model.dtype: 'float8' is not one of float32, bfloat16, float16",
        "method.encoder: 'gru' is not one of mlp, lstm",
        "method.encodr_hidden_size: unknown key (did you mean 'encoder_hidden_size'?)",
        "training.lrr: unknown key (did you mean 'lr'?)",
    ):
        assert expected in problems
    assert any(p.startswith("training.epochs: ") and "'many'" in p for p in problems)


def test_recipe_error_is_a_user_error():
    assert issubclass(RecipeError, UserError)


# --------------------------------------------------------------------------------------------- overrides


def test_override_yaml_typed_values():
    data = apply_overrides({}, ["a=true", "b=[x, y]", "c=3.0e-3", "d=5", "e=null", "f=hello", "g=", "h=1=2"])
    assert data == {"a": True, "b": ["x", "y"], "c": 3.0e-3, "d": 5, "e": None, "f": "hello", "g": "", "h": "1=2"}
    assert type(data["c"]) is float and type(data["d"]) is int


def test_override_text_with_a_colon_stays_text():
    data = apply_overrides({}, ["task.template=Question: {text} Answer:", "a=x: y", "b={k: 1}"])
    assert data == {"task": {"template": "Question: {text} Answer:"}, "a": "x: y", "b": {"k": 1}}


def test_override_creates_nested_mappings():
    data = apply_overrides({"keep": 1}, ["a.b.c=1", "a.b.d=two", "a.e=[1, 2]"])
    assert data == {"keep": 1, "a": {"b": {"c": 1, "d": "two"}, "e": [1, 2]}}


def test_override_replaces_a_scalar_with_a_mapping():
    assert apply_overrides({"a": 3}, ["a.b=4"]) == {"a": {"b": 4}}


def test_overrides_apply_in_order():
    assert apply_overrides({}, ["a=1", "a=2"]) == {"a": 2}


def test_overrides_on_a_recipe_are_typed():
    recipe = load_recipe(
        MRPC_RECIPE,
        [
            "training.lr=3e-3",
            "training.tensorboard=true",
            "task.metrics=[accuracy, f1]",
            "data.label_names=[not_equivalent, equivalent]",
            "method.num_virtual_tokens=7",
        ],
    )
    assert recipe.training.lr == pytest.approx(3e-3) and isinstance(recipe.training.lr, float)
    assert recipe.training.tensorboard is True
    assert recipe.task.metrics == ["accuracy", "f1"]
    assert recipe.data.label_names == ["not_equivalent", "equivalent"]
    assert recipe.method.num_virtual_tokens == 7


def test_override_creates_a_missing_section(tmp_path):
    path = write(
        tmp_path / "r.yaml",
        f"""
        model:
          name_or_path: {MINILM}
        data:
          glue_task: mrpc
        method:
          name: prompt_tuning
        """,
    )
    recipe = load_recipe(path, ["task.pooling=mean", "output.overwrite=true"])
    assert recipe.task.pooling == "mean"
    assert recipe.output.overwrite is True


def test_override_can_switch_method():
    recipe = load_recipe(MRPC_RECIPE, ["method={name: p_tuning, encoder: lstm}"])
    assert recipe.method.name == "p_tuning" and recipe.method.encoder == "lstm"


@pytest.mark.parametrize("override", ["training.lr", "=3", ""])
def test_override_without_equals_is_an_error(override):
    with pytest.raises(UserError, match="is not of the form key=value"):
        apply_overrides({}, [override])


def test_unknown_key_via_override():
    with pytest.raises(RecipeError) as info:
        load_recipe(MRPC_RECIPE, ["training.lrr=0.1"])
    assert info.value.problems == ["training.lrr: unknown key (did you mean 'lr'?)"]


# --------------------------------------------------------------------------------------------- the YAML file


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist") as info:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_recipe_path_is_a_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_yaml(tmp_path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(
        tmp_path / "bad.yaml",
        """\
        model:
          name_or_path: x
           oops: 1
        """,
    )
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "is not valid YAML at line 3" in message
    assert "bad.yaml" in message


def test_yaml_list_is_not_a_recipe(tmp_path):
    path = write(tmp_path / "list.yaml", "- model\n- data\n")
    with pytest.raises(UserError, match="must be a YAML mapping .*not a list"):
        load_recipe(path)


def test_yaml_scalar_is_not_a_recipe(tmp_path):
    path = write(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(UserError, match="must be a YAML mapping .*not a str"):
        load_recipe(path)


def test_empty_yaml_lists_required_sections(tmp_path):
    path = write(tmp_path / "empty.yaml", "")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "model: required, but missing",
        "data: required, but missing (or tasks, for a multi-task recipe)",
        "method: required, but missing",
    ]


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def in_repo(monkeypatch):
    """The shipped recipes use paths relative to the repository root (data.dir: ../shared/data/glue)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    return REPO


def assert_clean_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert out == ""
    message = err.strip()
    assert message.startswith("error: ")
    assert "\n\n" not in message, "the message should be one paragraph"
    return message


def files_recipe(folder: Path, train: str, validation: str, **data) -> Path:
    section = {"files": {"train": train, "validation": validation}, "text_fields": ["text"], **data}
    recipe = {"model": {"name_or_path": MINILM}, "data": section, "method": {"name": "prompt_tuning"}}
    path = folder / "files.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_cli_validate_ok(run_cli, in_repo):
    code, out, err = run_cli("validate", "recipes/mrpc_prompt_tuning.yaml")
    assert code == 0, err
    assert "OK" in out
    assert "3668 train" in out and "408 eval" in out
    assert "prompt_tuning" in out
    assert "Traceback" not in out + err


def test_cli_validate_ok_with_local_files(run_cli, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("text,label\nok,pos\n", encoding="utf-8")
    recipe = files_recipe(tmp_path, str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"))
    code, out, err = run_cli("validate", recipe)
    assert code == 0, err
    assert "OK" in out and "3 train / 1 eval" in out and "['neg', 'pos']" in out


def test_cli_validate_unknown_key(run_cli, in_repo):
    message = assert_clean_error(*run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", "training.lrr=0.1"))
    assert "training.lrr: unknown key (did you mean 'lr'?)" in message


def test_cli_validate_several_problems(run_cli, in_repo):
    message = assert_clean_error(
        *run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", "training.lrr=0.1", "training.lr=abc",
                 "method.name=p_tuning", "method.encoder=gru")
    )
    # lrr, lr, encoder literal, and the prompt_tuning-only `init` key now unknown for p_tuning.
    assert "has 4 problem(s)" in message
    assert "method.encoder: 'gru' is not one of mlp, lstm" in message
    assert "method.init: unknown key" in message


def test_cli_override_without_equals(run_cli, in_repo):
    message = assert_clean_error(*run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", "training.lr"))
    assert "key=value" in message


def test_cli_missing_recipe_file(run_cli, tmp_path):
    message = assert_clean_error(*run_cli("validate", tmp_path / "nope.yaml"))
    assert "does not exist" in message and "nope.yaml" in message


def test_cli_yaml_syntax_error(run_cli, tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  name_or_path: x\n   oops: 1\n")
    message = assert_clean_error(*run_cli("validate", path))
    assert "not valid YAML at line 3" in message


def test_cli_yaml_list(run_cli, tmp_path):
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    message = assert_clean_error(*run_cli("validate", path))
    assert "must be a YAML mapping" in message


def test_cli_missing_data_file(run_cli, tmp_path):
    recipe = files_recipe(tmp_path, str(tmp_path / "nowhere" / "train.csv"), str(tmp_path / "dev.csv"))
    message = assert_clean_error(*run_cli("validate", recipe))
    assert "data: data file" in message and "does not exist" in message
    assert str(tmp_path / "nowhere" / "train.csv") in message


def test_cli_missing_glue_dir(run_cli, in_repo, tmp_path):
    message = assert_clean_error(
        *run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", f"data.dir={tmp_path / 'no_glue'}")
    )
    assert "GLUE folder" in message and "does not exist" in message


def test_cli_missing_column(run_cli, tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    recipe = files_recipe(tmp_path, str(tmp_path / "train.csv"), str(tmp_path / "train.csv"))
    message = assert_clean_error(*run_cli("validate", recipe))
    assert "has no column(s) 'text'" in message
    assert "'label', 'sentence'" in message


def test_cli_label_not_in_label_set(run_cli, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("text,label\nok,pos\nhmm,neutral\n", encoding="utf-8")
    recipe = files_recipe(tmp_path, str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"))
    message = assert_clean_error(*run_cli("validate", recipe))
    assert "row 2 of" in message and "dev.csv" in message and "'neutral'" in message


def test_cli_label_not_in_given_label_names(run_cli, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n", encoding="utf-8")
    recipe = files_recipe(tmp_path, str(tmp_path / "train.csv"), str(tmp_path / "train.csv"),
                          label_names=["positive", "negative"])
    message = assert_clean_error(*run_cli("validate", recipe))
    assert "row 1 of" in message and "'pos'" in message


def test_cli_model_folder_without_config(run_cli, in_repo, tmp_path):
    message = assert_clean_error(
        *run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", f"model.name_or_path={tmp_path}")
    )
    assert "model.name_or_path: " in message and "no config.json" in message


def test_cli_reports_data_and_model_problems_together(run_cli, in_repo, tmp_path):
    message = assert_clean_error(
        *run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", f"data.dir={tmp_path / 'no_glue'}",
                 "model.name_or_path=./no/such/model")
    )
    assert "has 2 problem(s)" in message
    assert "  - data: GLUE folder" in message
    assert "  - model.name_or_path: model folder './no/such/model' does not exist" in message


def test_cli_unreachable_hub_model(run_cli, in_repo):
    message = assert_clean_error(
        *run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", "model.name_or_path=some-org/some-model")
    )
    assert "model.name_or_path: " in message and "some-org/some-model" in message
    assert "unreachable" in message


def test_cli_reports_data_and_hub_model_problems_together(run_cli, in_repo, tmp_path):
    message = assert_clean_error(
        *run_cli("validate", "recipes/mrpc_prompt_tuning.yaml", f"data.dir={tmp_path / 'no_glue'}",
                 "model.name_or_path=some-org/some-model")
    )
    assert "has 2 problem(s)" in message
    assert "  - data: " in message and "  - model.name_or_path: " in message


@pytest.mark.parametrize("name", ["train[v2].csv", "train[/x].csv"])
def test_cli_error_message_prints_brackets_verbatim(run_cli, tmp_path, name):
    missing = str(tmp_path / name)
    recipe = files_recipe(tmp_path, missing, missing)
    message = assert_clean_error(*run_cli("validate", recipe))
    assert missing in message


def test_cli_help(run_cli):
    code, out, err = run_cli("--help")
    assert code == 0
    for command in ("train", "validate", "methods"):
        assert command in out


# --------------------------------------------------------------------------------------------- import weight


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["validate", "recipes/mrpc_prompt_tuning.yaml"], ["validate", "recipes/mrpc_prompt_tuning.yaml",
                                                                   "training.lrr=1"], ["serve", "--help"]],
    ids=["help", "validate", "validate-error", "serve-help"],
)
def test_cli_does_not_import_torch_or_transformers(argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("GLUE_DIR", None)
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = 2 if argv[-1].startswith("training.") else 0
    assert f"exit {expected}" in result.stdout, result.stdout + result.stderr
