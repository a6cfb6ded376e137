"""Multi-task recipes: every method on several tasks, multitask prompt tuning (MPT) against PEFT, task sampling,
exact resume, two processes, target adaptation from a source MPT checkpoint, and distillation from teachers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    GLUE_DIR,
    REPO,
    SHARED_DATA,
    cli_exit_code,
    interrupt_at_optimizer_step,
    logged_without_timings,
    train_in_two_processes,
)
from safetensors.torch import load_file

AG_NEWS = SHARED_DATA / "ag_news"
MRPC_LABELS = ["not_equivalent", "equivalent"]


def glue_task(name: str, task: str, train: int = 16, evaluate: int = 12, **settings) -> dict:
    return {"name": name, "data": {"glue_task": task, "dir": str(GLUE_DIR), "max_train_samples": train,
                                   "max_eval_samples": evaluate}, "task": settings}


def ag_news_task(train: int = 16, evaluate: int = 12, **settings) -> dict:
    data = {"files": {"train": str(AG_NEWS / "train.tsv"), "test": str(AG_NEWS / "test.tsv")},
            "columns": ["text", "label"], "text_fields": ["text"], "label_field": "label",
            "label_names": ["World", "Sports", "Business", "Sci/Tech"], "eval_split": "test",
            "max_train_samples": train, "max_eval_samples": evaluate}
    return {"name": "agnews", "data": data, "task": settings}


def write_run_recipe(folder: Path, model: Path, method: dict, **sections) -> Path:
    """A short run's recipe in `folder` (its run goes to folder/run); `sections` update its sections or, for
    `tasks`, give them."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"model": {"name_or_path": str(model)}, "method": {"num_virtual_tokens": 4, **method},
              "training": {"batch_size": 8, "eval_batch_size": 8, "max_steps": 2, "log_steps": 1},
              "output": {"dir": str(folder / "run")}}
    for name, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(name, {}).update(values)
        else:
            recipe[name] = values
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_multitask(folder: Path, model: Path, method: dict, tasks: list[dict], **sections) -> Path:
    return write_run_recipe(folder, model, method, tasks=tasks, **sections)


def write_single(folder: Path, model: Path, method: dict, data: dict, task: dict | None = None) -> Path:
    return write_run_recipe(folder, model, method, data=data, task=task or {})


def glue_data(task: str, train: int = 16, evaluate: int = 12) -> dict:
    return {"glue_task": task, "dir": str(GLUE_DIR), "max_train_samples": train, "max_eval_samples": evaluate}


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def eval_metrics(run_cli, checkpoint: Path, out: Path, *extra) -> dict:
    code, stdout, stderr = run_cli("eval", checkpoint, "--output", out, *extra)
    assert code == 0, stdout + stderr
    return json.loads(out.read_text())["metrics"]


# ---------------------------------------------------------------- recipes


def recipe_data(**changes) -> dict:
    data = {"model": {"name_or_path": "m"}, "method": {"name": "multitask_prompt_tuning"},
            "tasks": [glue_task("sst2", "sst2", pooling="mean"), glue_task("cola", "cola", pooling="mean")]}
    return {**data, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"tasks": [glue_task("default", "sst2"), glue_task("cola", "cola")]}, "'default' is reserved"),
    ({"tasks": [glue_task("sst2", "sst2"), glue_task("sst2", "cola")]}, "more than once"),
    ({"tasks": [glue_task("sst2", "sst2", pooling="mean"), glue_task("cola", "cola")]}, "task.pooling"),
    ({"distillation": {"teachers": {"sst2": "x"}}}, "none for cola"),
    ({"task": {"pooling": "mean"}}, "not at the top"),
])
def test_multitask_recipe_mistakes_are_refused(changes, message):
    from softprompt_cli.config.load import RecipeError, parse_recipe

    parse_recipe(recipe_data())
    with pytest.raises(RecipeError) as refused:
        parse_recipe(recipe_data(**changes))
    assert message in "; ".join(refused.value.problems)


def test_importing_one_method_first_still_registers_all():
    """A method module imported before anything asks for the registry (as this file's imports do) registers
    itself; the registry must still load the others."""
    subprocess.run([sys.executable, "-c", "import softprompt_cli.methods.multitask_prompt_tuning\n"
                    "from softprompt_cli.methods.base import registry\n"
                    "assert {'prompt_tuning', 'p_tuning', 'prefix_tuning'} <= set(registry()), registry()"],
                   cwd=REPO, check=True)


# ---------------------------------------------------------------- MPT's math against PEFT


def test_task_prompts_equal_peft_multitask_prompt_embedding():
    from peft import MultitaskPromptTuningConfig, MultitaskPromptTuningInit
    from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding

    from softprompt_cli.methods._layers import TaskPrompts

    torch.manual_seed(0)
    n, width, tasks, rank = 5, 16, 3, 2
    config = MultitaskPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n, token_dim=width,
                                         num_transformer_submodules=1, num_tasks=tasks, num_ranks=rank,
                                         prompt_tuning_init=MultitaskPromptTuningInit.RANDOM)
    theirs = MultitaskPromptEmbedding(config, torch.nn.Embedding(50, width))
    ours = TaskPrompts(theirs.embedding.weight.detach().clone(), theirs.prefix_task_cols.detach().clone(),
                       theirs.prefix_task_rows.detach().clone())
    task_ids = torch.tensor([2, 0, 1, 0, 2, 1])
    expected = theirs(torch.arange(n).expand(len(task_ids), -1), task_ids)
    got = ours(task_ids)
    torch.testing.assert_close(got, expected)
    # The same gradients too: both train the same three tensors.
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.embedding.grad, theirs.embedding.weight.grad)
    torch.testing.assert_close(ours.task_cols.grad, theirs.prefix_task_cols.grad)
    torch.testing.assert_close(ours.task_rows.grad, theirs.prefix_task_rows.grad)


def test_new_factors_start_near_all_ones():
    from softprompt_cli.methods.multitask_prompt_tuning import new_factors

    torch.manual_seed(0)
    for rank in (1, 3):
        cols, rows = new_factors(4, 6, rank, 32)
        assert cols.shape == (4, 6, rank) and rows.shape == (4, rank, 32)
        product = cols @ rows
        assert (product - 1).abs().max() < 0.2 and product.std() > 0  # near ones, yet not all the same


CAUSAL_TASKS = [glue_task("sst2", "sst2", type="causal_lm", template="Review: {sentence}\nSentiment:",
                          label_words={"negative": " bad", "positive": " good"}),
                glue_task("cola", "cola", type="causal_lm", template="Sentence: {sentence}\nGrammatical?",
                          label_words={"unacceptable": " not ok", "acceptable": " fine"})]


def mpt_model(model_dir: Path, pooling: str = "mean"):
    from softprompt_cli.assemble import build_model
    from softprompt_cli.config.load import parse_recipe

    recipe = parse_recipe({"model": {"name_or_path": str(model_dir)},
                           "tasks": [glue_task("sst2", "sst2", pooling=pooling),
                                     ag_news_task(pooling=pooling)],
                           "method": {"name": "multitask_prompt_tuning", "num_virtual_tokens": 4, "rank": 2}})
    torch.manual_seed(0)
    model, tokenizer = build_model(recipe, {"sst2": ["negative", "positive"],
                                            "agnews": ["World", "Sports", "Business", "Sci/Tech"]})
    with torch.no_grad():  # factors far from ones, so that the tasks' prompts differ clearly
        model.prompt.task_cols.normal_()
        model.prompt.task_rows.normal_()
    return model.eval(), tokenizer


@pytest.mark.parametrize("pooling", ["mean", "model"])
def test_mixed_task_batch_equals_each_row_alone(tiny_models, pooling):
    """Rows of several tasks in one batch: each gets its own task's prompt and head, as if run alone, and the
    logits of a task with fewer labels are padded with NOT_A_LABEL."""
    from softprompt_cli.model.soft_prompt import NOT_A_LABEL

    model, tokenizer = mpt_model(tiny_models["bert"], pooling)
    texts = ["a fine film", "stocks fell sharply on monday", "dull", "the team won the cup final"]
    task_ids = torch.tensor([0, 1, 0, 1])
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    together = model.scores(**batch, task_ids=task_ids)
    assert together.shape == (4, 4)
    assert (together[task_ids == 0, 2:] == NOT_A_LABEL).all()
    for row, task in enumerate(task_ids.tolist()):
        alone = dict(tokenizer(texts[row], return_tensors="pt"))
        scores = model.scores(**alone, task_ids=torch.tensor([task]))
        width = 2 if task == 0 else 4
        torch.testing.assert_close(together[row, :width], scores[0, :width], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.prompt_for(torch.tensor([task]), 1),  # one task: its prompt, shared
                                   model.task_prompt(model.task_names[task]))
    # Otherwise the check above could not tell the tasks' prompts apart.
    assert not torch.allclose(model.task_prompt("sst2"), model.task_prompt("agnews"))


def test_mixed_task_causal_lm_rows_score_their_own_label_words(tiny_models):
    """causal_lm rows of several tasks in one batch: each row's own prompt and label words (one task's words are
    several tokens long), as if run alone."""
    from softprompt_cli.assemble import build_model
    from softprompt_cli.config.load import parse_recipe

    recipe = parse_recipe({"model": {"name_or_path": str(tiny_models["llama"])}, "tasks": CAUSAL_TASKS,
                           "method": {"name": "multitask_prompt_tuning", "num_virtual_tokens": 4}})
    torch.manual_seed(0)
    model, tokenizer = build_model(recipe, {"sst2": ["negative", "positive"], "cola": ["unacceptable", "acceptable"]})
    with torch.no_grad():
        model.prompt.task_cols.normal_()
    model.eval()
    assert [len(words) for words in model.task_label_words["cola"]] == [2, 1]
    texts = ["Review: a fine film\nSentiment:", "Sentence: him saw she\nGrammatical?", "Review: dull\nSentiment:"]
    task_ids = torch.tensor([0, 1, 0])
    together = model.scores(**dict(tokenizer(texts, padding=True, return_tensors="pt")), task_ids=task_ids)
    for row, task in enumerate(task_ids.tolist()):
        alone = model.scores(**dict(tokenizer(texts[row], return_tensors="pt")), task_ids=torch.tensor([task]))
        torch.testing.assert_close(together[row], alone[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- task sampling


def test_task_mix_counts_follow_the_rule():
    from softprompt_cli.data.batching import TaskMix

    sizes = (100, 10, 1)
    assert TaskMix(sizes, "proportional").counts() == [100, 10, 1]
    assert TaskMix(sizes, "uniform").counts() == [37, 37, 37]
    # size_k ** (1 / T), scaled to the epoch's rows: sqrt -> 10, 3.16, 1 of 14.16, times 111.
    assert TaskMix(sizes, "temperature", 2.0).counts() == [78, 25, 8]
    assert TaskMix(sizes, "temperature", 1.0).counts() == [100, 10, 1]
    assert TaskMix((7,), "uniform").counts() == [7]


@pytest.mark.parametrize("rule", ["proportional", "temperature", "uniform"])
def test_task_mix_draws_are_seeded_and_as_counted(rule):
    from softprompt_cli.data.batching import LengthGroupedSampler, TaskMix

    sizes = (30, 6, 2)
    mix = TaskMix(sizes, rule, 2.0)
    draw = mix.draw(torch.Generator().manual_seed(5))
    assert draw == mix.draw(torch.Generator().manual_seed(5))
    assert draw != mix.draw(torch.Generator().manual_seed(6))
    bounds = [0, 30, 36, 38]
    for task, count in enumerate(mix.counts()):
        rows = [i for i in draw if bounds[task] <= i < bounds[task + 1]]
        assert len(rows) == count
        # Each row of a task as often as the others, give or take one (rounds of a fresh order).
        per_row = [rows.count(i) for i in range(bounds[task], bounds[task + 1])]
        assert max(per_row) - min(per_row) <= 1
    if rule == "proportional":
        assert sorted(draw) == list(range(38))
    lengths = [5 + i % 7 for i in range(38)]
    sampler = LengthGroupedSampler(lengths, 4, shuffle=True, group=True, seed=3, mix=mix)
    first = list(sampler)
    assert len(first) == len(sampler) == sum(mix.counts()) and first == list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    if rule == "proportional":
        assert sorted(second) == sorted(first)


# ---------------------------------------------------------------- every method, from the CLI

CLASSIFICATION_TASKS = ["sst2/accuracy", "cola/matthews_correlation", "cola/accuracy", "agnews/accuracy", "mean"]


def three_tasks(pooling: str) -> list[dict]:
    return [glue_task("sst2", "sst2", pooling=pooling), glue_task("cola", "cola", pooling=pooling),
            ag_news_task(pooling=pooling)]


@pytest.mark.parametrize("method, pooling", [
    ({"name": "prompt_tuning"}, "mean"),
    ({"name": "p_tuning", "encoder": "mlp", "encoder_hidden_size": 8}, "mean"),
    ({"name": "prefix_tuning"}, "mean"),
    ({"name": "multitask_prompt_tuning", "rank": 2}, "mean"),
    ({"name": "multitask_prompt_tuning"}, "model"),
])
def test_every_method_trains_on_three_tasks(tmp_path, tiny_models, run_cli, method, pooling):
    recipe = write_multitask(tmp_path, tiny_models["bert"], method, three_tasks(pooling))
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    run = tmp_path / "run"
    final = summary_of(run)["final"]
    assert list(final) == CLASSIFICATION_TASKS
    assert final["mean"] == pytest.approx(
        (final["sst2/accuracy"] + final["cola/matthews_correlation"] + final["agnews/accuracy"]) / 3)
    info = json.loads((run / "final" / "checkpoint.json").read_text())
    assert list(info["tasks"]) == ["sst2", "cola", "agnews"] and info["tasks"]["agnews"][0] == "World"
    weights = load_file(run / "final" / "softprompt.safetensors")
    assert weights["heads.agnews.weight"].shape[0] == 4 and weights["heads.cola.weight"].shape[0] == 2
    assert eval_metrics(run_cli, run / "final", tmp_path / "eval.json") == final
    if method["name"] == "multitask_prompt_tuning":
        assert weights["prompt.task_cols"].shape == (3, 4, method.get("rank", 1))
        # One task alone, by --task: the same numbers as in the run's evaluation of all tasks.
        cola = eval_metrics(run_cli, run / "final", tmp_path / "cola.json", "--task", "cola")
        assert {k: v for k, v in cola.items() if k.startswith("cola/")} == \
            {k: v for k, v in final.items() if k.startswith("cola/")}


def test_multitask_causal_lm_with_own_templates_and_label_words(tmp_path, tiny_models, run_cli):
    recipe = write_multitask(tmp_path, tiny_models["llama"], {"name": "multitask_prompt_tuning"}, CAUSAL_TASKS,
                             training={"max_steps": 3})
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    run = tmp_path / "run"
    final = summary_of(run)["final"]
    assert list(final) == ["sst2/accuracy", "cola/matthews_correlation", "cola/accuracy", "mean"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["prompt_grad_norm"] > 0 for r in records if "loss" in r)
    assert eval_metrics(run_cli, run / "final", tmp_path / "eval.json") == final
    sst2 = eval_metrics(run_cli, run / "final", tmp_path / "sst2.json", "--task", "sst2")
    assert sst2["sst2/accuracy"] == final["sst2/accuracy"]


# ---------------------------------------------------------------- exact resume


def test_interrupted_multitask_run_resumes_exactly(tmp_path, tiny_models, run_cli, monkeypatch):
    tasks = [glue_task("sst2", "sst2", train=16, pooling="mean"), glue_task("cola", "cola", train=8, pooling="mean")]
    sections = {"task_sampling": {"rule": "temperature", "temperature": 2.0},
                "training": {"max_steps": None, "epochs": 2, "log_steps": 2}}
    method = {"name": "multitask_prompt_tuning", "rank": 2}
    for name in ("straight", "stopped"):
        write_multitask(tmp_path / name, tiny_models["bert"], method, tasks, **sections)
    assert run_cli("train", tmp_path / "straight" / "recipe.yaml")[0] == 0
    with monkeypatch.context() as patch:
        interrupt_at_optimizer_step(patch, 4)  # 3 steps an epoch (14 + 10 rows): mid second epoch
        code, out, err = run_cli("train", tmp_path / "stopped" / "recipe.yaml")
    assert code == 130 and "stopped at step 4" in err, out + err
    code, out, err = run_cli("train", tmp_path / "stopped" / "recipe.yaml", "--resume")
    assert code == 0 and "resumed at step 4" in out, out + err
    a, b = tmp_path / "straight" / "run", tmp_path / "stopped" / "run"
    assert summary_of(a)["steps"] == 6
    for name in ("final", "best"):
        weights_a, weights_b = (load_file(run / name / "softprompt.safetensors") for run in (a, b))
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            torch.testing.assert_close(weights_b[key], weights_a[key], atol=1e-6, rtol=0)
    assert summary_of(b)["final"] == summary_of(a)["final"]
    assert logged_without_timings(b) == logged_without_timings(a)


# ---------------------------------------------------------------- two processes


def test_two_processes_gather_every_tasks_metrics(tmp_path, tiny_models, run_cli):
    """Two gloo processes (as test_train's): odd eval counts per task exercise gather_for_metrics' de-duplication
    of the padded last batch; the gathered per-task metrics equal a single-process eval of the checkpoint."""
    tasks = [glue_task("sst2", "sst2", evaluate=7, pooling="mean"),
             glue_task("cola", "cola", train=8, evaluate=5, pooling="mean")]
    recipe = write_multitask(tmp_path, tiny_models["bert"], {"name": "multitask_prompt_tuning"}, tasks,
                             task_sampling={"rule": "uniform"}, training={"max_steps": 3})
    train_in_two_processes(recipe)
    run = tmp_path / "run"
    final = summary_of(run)["final"]
    assert list(final) == CLASSIFICATION_TASKS[:3] + ["mean"]
    code, out, err = run_cli("eval", run / "final", "--output", tmp_path / "eval.json")
    assert code == 0, out + err
    single = json.loads((tmp_path / "eval.json").read_text())
    assert single["examples"] == 12
    assert single["metrics"] == final


# ---------------------------------------------------------------- source runs: teachers and an MPT source


@pytest.fixture(scope="module")
def teachers(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Single-task prompt_tuning checkpoints of sst2 and cola (mean pooling): distillation teachers, and a
    prompt_tuning checkpoint to start an MPT prompt from."""
    root = tmp_path_factory.mktemp("teachers")
    finals = {}
    for task in ("sst2", "cola"):
        recipe = write_single(root / task, tiny_models["bert"], {"name": "prompt_tuning"}, glue_data(task),
                              {"pooling": "mean"})
        assert cli_exit_code("train", recipe) == 0
        finals[task] = root / task / "run" / "final"
    return finals


@pytest.fixture(scope="module")
def mpt_source(tiny_models, tmp_path_factory) -> Path:
    """A source MPT run on sst2 and cola (rank 2): its final/ checkpoint."""
    root = tmp_path_factory.mktemp("mpt_source")
    recipe = write_multitask(root, tiny_models["bert"], {"name": "multitask_prompt_tuning", "rank": 2},
                             [glue_task("sst2", "sst2", pooling="mean"), glue_task("cola", "cola", pooling="mean")])
    assert cli_exit_code("train", recipe) == 0
    return root / "run" / "final"


def target_recipe(model_dir: Path, source: Path, init: str, rank: int = 2, **options):
    from softprompt_cli.config.load import parse_recipe

    return parse_recipe({"model": {"name_or_path": str(model_dir)}, "data": glue_data("mrpc"),
                         "task": {"pooling": "pair_mean"},
                         "method": {"name": "multitask_prompt_tuning", "num_virtual_tokens": 4, "rank": rank,
                                    "init": init, "init_checkpoint": str(source), **options}})


@pytest.mark.parametrize("init", ["source_shared", "source_task", "source_average"])
def test_target_starts_from_the_source(tiny_models, mpt_source, init):
    from softprompt_cli.assemble import build_model

    source = load_file(mpt_source / "softprompt.safetensors")
    options = {"init_task": "cola"} if init == "source_task" else {}
    model, _ = build_model(target_recipe(tiny_models["bert"], mpt_source, init, **options), MRPC_LABELS)
    prompt = model.prompt
    assert torch.equal(prompt.embedding.detach(), source["prompt.embedding"])
    assert prompt.task_cols.shape == (1, 4, 2) and prompt.task_rows.shape == (1, 2, 32)
    if init == "source_task":  # cola is the source's second task
        assert torch.equal(prompt.task_cols[0].detach(), source["prompt.task_cols"][1])
        assert torch.equal(prompt.task_rows[0].detach(), source["prompt.task_rows"][1])
    elif init == "source_average":
        torch.testing.assert_close(prompt.task_cols[0].detach(), source["prompt.task_cols"].mean(0))
        torch.testing.assert_close(prompt.task_rows[0].detach(), source["prompt.task_rows"].mean(0))
    else:  # new factors: the task's prompt starts near the shared one
        product = (prompt.task_cols @ prompt.task_rows).detach()
        assert (product - 1).abs().max() < 0.2


def test_target_init_mismatches_are_refused(tiny_models, mpt_source, teachers):
    from softprompt_cli.assemble import build_model
    from softprompt_cli.errors import UserError

    with pytest.raises(UserError, match="init_task 'qnli' is not a task"):
        build_model(target_recipe(tiny_models["bert"], mpt_source, "source_task", init_task="qnli"), MRPC_LABELS)
    with pytest.raises(UserError, match="rank"):
        build_model(target_recipe(tiny_models["bert"], mpt_source, "source_average", rank=1), MRPC_LABELS)
    with pytest.raises(UserError, match="prompt_tuning checkpoint"):
        build_model(target_recipe(tiny_models["bert"], teachers["sst2"], "source_average"), MRPC_LABELS)


def test_source_shared_from_a_prompt_tuning_checkpoint(tiny_models, teachers):
    from softprompt_cli.assemble import build_model

    model, _ = build_model(target_recipe(tiny_models["bert"], teachers["sst2"], "source_shared", rank=1),
                           MRPC_LABELS)
    source = load_file(teachers["sst2"] / "softprompt.safetensors")
    assert torch.equal(model.prompt.embedding.detach(), source["prompt.embedding"])


def test_trained_target_loads_without_its_source(tmp_path, tiny_models, run_cli, mpt_source):
    """A trained target's recipe names its source checkpoint; eval rebuilds it from its own tensors."""
    source = tmp_path / "source"
    shutil.copytree(mpt_source, source)
    recipe = write_single(tmp_path / "target", tiny_models["bert"],
                          {"name": "multitask_prompt_tuning", "rank": 2, "init": "source_task", "init_task": "sst2",
                           "init_checkpoint": str(source)}, glue_data("mrpc"), {"pooling": "pair_mean"})
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    run = tmp_path / "target" / "run"
    final = summary_of(run)["final"]
    assert set(final) == {"accuracy", "f1"}
    shutil.rmtree(source)
    assert eval_metrics(run_cli, run / "final", tmp_path / "eval.json") == final


# ---------------------------------------------------------------- distillation


def test_distillation_loss_is_zero_only_for_the_teachers_outputs():
    from softprompt_cli.model.soft_prompt import NOT_A_LABEL, distillation_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    logits[:3, 2:] = NOT_A_LABEL  # rows of a two-label task, padded
    states = torch.randn(20, 8)
    weights = (1.0, 1.0, 2.0)
    same = distillation_loss(logits, states, logits.clone(), states.clone(), weights)
    assert same.abs() < 1e-6
    assert distillation_loss(logits, states, logits + torch.randn(6, 4), states, weights) > 1e-3
    assert distillation_loss(logits, states, logits, states + 0.1, weights) > 1e-3
    assert distillation_loss(logits, states, logits, states + 0.1, (1.0, 0.0, 2.0)).abs() < 1e-6


def distillation_recipe(folder: Path, model_dir: Path, teachers: dict[str, Path]) -> Path:
    tasks = [glue_task("sst2", "sst2", pooling="mean"), glue_task("cola", "cola", pooling="mean")]
    return write_multitask(folder, model_dir, {"name": "multitask_prompt_tuning"}, tasks,
                           distillation={"teachers": {k: str(v) for k, v in teachers.items()},
                                         "logits_weight": 1.0, "hidden_weight": 0.5, "temperature": 2.0})


def test_distilled_source_run_trains(tmp_path, tiny_models, run_cli, teachers):
    recipe = distillation_recipe(tmp_path, tiny_models["bert"], teachers)
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    run = tmp_path / "run"
    final = summary_of(run)["final"]
    assert list(final) == ["sst2/accuracy", "cola/matthews_correlation", "cola/accuracy", "mean"]
    assert eval_metrics(run_cli, run / "final", tmp_path / "eval.json") == final


def test_teacher_outputs_are_each_teachers_own(tmp_path, tiny_models, teachers):
    """Every row's teacher logits are its task's teacher's (in eval mode: the same on every call, even while the
    shared base model trains), laid out as the student's."""
    from accelerate import Accelerator

    from softprompt_cli.assemble import load_trained
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.training.distill import teacher_outputs
    from softprompt_cli.training.loop import set_up

    run = set_up(load_recipe(distillation_recipe(tmp_path, tiny_models["bert"], teachers)), Accelerator())
    assert run.unwrapped.distill_weights == (1.0, 0.5, 2.0)
    batch = next(b for b in run.train_loader if len(b["task_ids"].unique()) == 2)  # rows of both tasks
    run.model.train()
    outputs = teacher_outputs(run.teachers, run.unwrapped, batch)
    again = teacher_outputs(run.teachers, run.unwrapped, batch)
    torch.testing.assert_close(again["teacher_logits"], outputs["teacher_logits"])
    assert len(outputs["teacher_states"]) == int(batch["attention_mask"].sum())
    for index, task in enumerate(("sst2", "cola")):
        rows = batch["task_ids"] == index
        _, teacher, _, _ = load_trained(teachers[task])
        alone = teacher.eval().scores(batch["input_ids"][rows], batch["attention_mask"][rows],
                                      batch["token_type_ids"][rows])
        torch.testing.assert_close(outputs["teacher_logits"][rows], alone, atol=1e-5, rtol=1e-4)


def test_teacher_states_follow_the_batch_rows(tmp_path, tiny_models, teachers):
    """Each row's teacher states are its teacher's real-token states, in the order the student lays out its own
    (row after row), however the tasks' rows are interleaved."""
    from accelerate import Accelerator

    from softprompt_cli.assemble import load_trained
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.model.soft_prompt import distilled_states
    from softprompt_cli.training.distill import teacher_outputs
    from softprompt_cli.training.loop import set_up

    run = set_up(load_recipe(distillation_recipe(tmp_path, tiny_models["bert"], teachers)), Accelerator())
    batch = next(b for b in run.train_loader if len(b["task_ids"].unique()) == 2)
    outputs = teacher_outputs(run.teachers, run.unwrapped, batch)
    models = {index: load_trained(teachers[task])[1].eval() for index, task in enumerate(("sst2", "cola"))}
    expected = []
    for row, task in enumerate(batch["task_ids"].tolist()):
        model = models[task]
        one = {k: batch[k][row:row + 1] for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            encoded = model.encode(one["input_ids"], one["attention_mask"], one["token_type_ids"], model.prompt())
        expected.append(distilled_states(encoded)[0])
    torch.testing.assert_close(outputs["teacher_states"], torch.cat(expected), atol=1e-5, rtol=1e-4)
