"""Nothing lost, nothing silent: eval on new data (--recipe, --data, data.* overrides), data paths that work from
any folder, predict output columns that never replace input columns, a held-out validation split, and the
class F1 / precision / recall are computed for."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, cli_exit_code, write_recipe

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "film", "plot", "actor", "scene"]


def write_rows(path: Path, count: int, seed: int, labels=("neg", "pos")) -> Path:
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(5)), "label": labels[i % len(labels)]}
            for i in range(count)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def files_recipe(folder: Path, model: str, files: dict, **sections) -> Path:
    """A recipe on local csv files (no GLUE), written to folder/recipe.yaml."""
    path = write_recipe(folder, model, {"name": "prompt_tuning"}, training={"max_steps": 2}, **sections)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"] = {"files": files, "text_fields": ["text"], "max_length": 32,
                      **{k: v for k, v in sections.get("data", {}).items() if k != "files"}}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny-BERT checkpoint trained on csv files with labels neg/pos (the positive label made 'neg')."""
    folder = tmp_path_factory.mktemp("trained")
    files = {"train": str(write_rows(folder / "train.csv", 40, 1)),
             "validation": str(write_rows(folder / "dev.csv", 16, 2))}
    recipe = files_recipe(folder, str(tiny_models["bert"]), files, task={"pooling": "mean", "metrics": [
        "accuracy", "f1", "precision", "recall"], "positive_label": "neg"})
    assert cli_exit_code("train", recipe) == 0
    return {"folder": folder, "checkpoint": folder / "run" / "final", "recipe": recipe,
            "dev": Path(files["validation"])}


def eval_report(run_cli, tmp_path, *args) -> dict:
    out_file = tmp_path / f"eval{random.random()}.json"
    code, out, err = run_cli("eval", *args, "--output", out_file)
    assert code == 0, out + err
    return json.loads(out_file.read_text())


# ----------------------------------------------------------------------------- 11: eval on new data


def test_eval_data_file_uses_the_checkpoint_fields_and_labels(tmp_path, trained, run_cli):
    own = eval_report(run_cli, tmp_path, trained["checkpoint"])
    again = eval_report(run_cli, tmp_path, trained["checkpoint"], "--data", trained["dev"])
    assert again["metrics"] == own["metrics"] and again["examples"] == own["examples"] == 16
    assert again["split"] == str(trained["dev"])
    # a new file, with labels in another order and a column the checkpoint does not read
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"id": i, "text": f"good film {i}", "label": "pos" if i % 3 else "neg"}) + "\n"
                           for i in range(9)))
    assert eval_report(run_cli, tmp_path, trained["checkpoint"], "--data", new)["examples"] == 9
    limited = eval_report(run_cli, tmp_path, trained["checkpoint"], "--data", new, "data.max_eval_samples=4")
    assert limited["examples"] == 4


def test_eval_data_file_with_an_unknown_label_names_it(tmp_path, trained, run_cli):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood film,pos\nodd film,maybe\nbad film,neg\n")
    code, out, err = run_cli("eval", trained["checkpoint"], "--data", bad)
    assert code == 2 and "'maybe' (row 2)" in err and "does not know" in err and "Traceback" not in out + err


def test_eval_recipe_gives_the_data_section(tmp_path, tiny_models, trained, run_cli):
    other = files_recipe(tmp_path, str(tiny_models["bert"]),
                         {"train": str(write_rows(tmp_path / "t.csv", 12, 5)),
                          "validation": str(write_rows(tmp_path / "v.csv", 7, 6))})
    report = eval_report(run_cli, tmp_path, trained["checkpoint"], "--recipe", other)
    assert report["examples"] == 7 and report["split"] == "validation"
    # labels that are not the checkpoint's: refused, not silently mapped by position
    (tmp_path / "w").mkdir()
    wrong = files_recipe(tmp_path / "w", str(tiny_models["bert"]),
                         {"train": str(write_rows(tmp_path / "t3.csv", 12, 5, ("bad", "good"))),
                          "validation": str(write_rows(tmp_path / "v3.csv", 7, 6, ("bad", "good")))})
    code, out, err = run_cli("eval", trained["checkpoint"], "--recipe", wrong)
    assert code == 2 and "['bad', 'good']" in err and "['neg', 'pos']" in err and "Traceback" not in out + err
    (tmp_path / "g").mkdir()
    glue = write_recipe(tmp_path / "g", str(tiny_models["bert"]), {"name": "prompt_tuning"})
    code, out, err = run_cli("eval", trained["checkpoint"], "--recipe", glue)
    assert code == 2 and "not_equivalent" in err


@pytest.mark.parametrize("args, message", [
    (["training.lr=1"], "data section only"),
    (["data.max_train_samples=3"], "max_train_samples"),
    (["--data", "DEV", "--split", "validation"], "Drop --split"),
    (["--data", "DEV", "data.files.train=x.csv"], "data.files"),
    (["--data", "DEV", "--recipe", "RECIPE"], "not both"),
    (["--split", "train", "data.eval_split=train"], "give one of them"),
    (["--data", "missing.csv"], "does not exist"),
])
def test_eval_refuses_conflicting_options(tmp_path, trained, run_cli, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    args = [{"DEV": trained["dev"], "RECIPE": trained["recipe"]}.get(a, a) for a in args]
    code, out, err = run_cli("eval", trained["checkpoint"], *args)
    assert code == 2 and message in err and "Traceback" not in out + err, out + err


def test_eval_split_override_applies_to_another_split(tmp_path, trained, run_cli):
    report = eval_report(run_cli, tmp_path, trained["checkpoint"], "--split", "train", "data.max_eval_samples=5")
    assert report["examples"] == 5 and report["split"] == "train"
    assert eval_report(run_cli, tmp_path, trained["checkpoint"], "--split", "train")["examples"] == 40


# ----------------------------------------------------------------------------- 12: paths from any folder


def test_relative_paths_are_resolved_when_the_recipe_is_loaded(tmp_path, tiny_models, run_cli, monkeypatch):
    from softprompt_cli.config.load import load_recipe

    first, second = tmp_path / "first", tmp_path / "second"
    (first / "data").mkdir(parents=True)
    second.mkdir()
    write_rows(first / "data" / "train.csv", 24, 1)
    write_rows(first / "data" / "dev.csv", 8, 2)
    recipe = files_recipe(first, str(tiny_models["bert"]), {"train": "data/train.csv", "validation": "data/dev.csv"},
                          task={"pooling": "mean"})
    monkeypatch.chdir(first)
    loaded = load_recipe(recipe)
    assert loaded.data.files == {"train": str(first / "data" / "train.csv"),
                                 "validation": str(first / "data" / "dev.csv")}
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    saved = yaml.safe_load((first / "run" / "final" / "recipe.yaml").read_text())
    assert saved["data"]["files"]["train"] == str(first / "data" / "train.csv")

    monkeypatch.chdir(second)  # the checkpoint's data is found from another folder
    report = eval_report(run_cli, tmp_path, first / "run" / "final")
    assert report["examples"] == 8


def test_glue_dir_is_resolved_and_unset_dir_stays_unset(tmp_path, tiny_models, monkeypatch):
    from softprompt_cli.config.load import load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                          data={"dir": os.path.relpath(GLUE_DIR, tmp_path)})
    assert load_recipe(recipe).data.dir == str(GLUE_DIR.resolve())
    assert load_recipe(recipe, ["data.dir=null"]).data.dir is None  # $GLUE_DIR / the Hub stay the fallbacks
    assert load_recipe(recipe, ["data.dir=~/glue"]).data.dir == os.path.expanduser("~/glue")


# ----------------------------------------------------------------------------- 13: predict keeps input columns


def test_predict_keeps_every_input_column(tmp_path, trained, run_cli):
    rows = [{"text": "good film", "label": "gold-pos", "task": "mine", "score": 7},
            {"text": "bad plot", "label": "gold-neg", "task": "mine", "score": 3}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli("predict", trained["checkpoint"], "--input", source, "--task-column", "none")
    assert code == 0, out + err
    results = [json.loads(line) for line in out.splitlines()]
    for row, result in zip(rows, results):
        assert {k: result[k] for k in row} == row  # nothing overwritten
        assert result["pred_label"] in ("neg", "pos") and result["pred_task"] == "run"
        assert set(result["pred_probabilities"]) == {"neg", "pos"}
        assert result["pred_score"] == max(result["pred_probabilities"].values())
    code, out, err = run_cli("predict", trained["checkpoint"], "--input", source, "--task-column", "none",
                             "--output", tmp_path / "out.csv")
    assert code == 0, out + err
    header = (tmp_path / "out.csv").read_text().splitlines()[0].split(",")
    assert header == ["text", "label", "task", "score", "pred_task", "pred_label", "pred_score", "pred_p_neg",
                      "pred_p_pos"]


def test_predict_refuses_input_columns_with_the_output_prefix(tmp_path, trained, run_cli):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "good film", "pred_label": "pos"}) + "\n")
    code, out, err = run_cli("predict", trained["checkpoint"], "--input", source)
    assert code == 2 and "'pred_label'" in err and "Rename or drop" in err and "Traceback" not in out + err


# ----------------------------------------------------------------------------- 14: a held-out validation split


def test_validation_fraction_holds_out_part_of_train(tmp_path):
    from softprompt_cli.config.schema import DataSection
    from softprompt_cli.data.sources import load_examples, read_split

    files = {"train": str(write_rows(tmp_path / "train.csv", 40, 1)), "test": str(write_rows(tmp_path / "t.csv", 8, 2))}
    data = DataSection(files=files, text_fields=["text"], validation_fraction=0.25)
    train, held = read_split(data, "train"), read_split(data, "validation")
    assert len(train.rows) == 30 and len(held.rows) == 10
    everything = read_split(DataSection(files=files, text_fields=["text"], eval_split="test"), "train").rows
    assert sorted(map(str, train.rows + held.rows)) == sorted(map(str, everything))
    assert read_split(data, "validation").rows == held.rows  # deterministic
    assert read_split(data.model_copy(update={"split_seed": 1}), "validation").rows != held.rows
    assert read_split(data, "test").rows == read_split(DataSection(files=files, text_fields=["text"],
                                                                   eval_split="test"), "test").rows
    train_examples, eval_examples, names = load_examples(data)
    assert (len(train_examples), len(eval_examples), names) == (30, 10, ["neg", "pos"])


@pytest.mark.parametrize("data, message", [
    ({"files": {"train": "a.csv", "validation": "b.csv"}}, "already has a split"),
    ({"files": {"train": "a.csv"}, "eval_split": "train"}, "not the train split"),
    ({"glue_task": "mrpc"}, "already has a split"),
    ({"files": {"train": "a.csv"}, "validation_fraction": 0.5}, "less than 0.5"),
])
def test_validation_fraction_is_refused_where_it_would_hide_a_split(data, message):
    from softprompt_cli.config.load import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match=message):
        parse_recipe({"model": {"name_or_path": "m"}, "method": {"name": "prompt_tuning"},
                      "data": {"text_fields": ["text"], "validation_fraction": 0.1, **data}})


def test_training_chooses_best_on_the_held_out_split_and_eval_reproduces_it(tmp_path, tiny_models, run_cli):
    files = {"train": str(write_rows(tmp_path / "train.csv", 40, 1)), "test": str(write_rows(tmp_path / "t.csv", 8, 2))}
    recipe = files_recipe(tmp_path, str(tiny_models["bert"]), files, data={"validation_fraction": 0.2},
                          task={"pooling": "mean"})
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    assert "looks like a test set" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    report = eval_report(run_cli, tmp_path, tmp_path / "run" / "final")
    assert report["split"] == "validation" and report["examples"] == 8 and report["metrics"] == summary["final"]
    assert eval_report(run_cli, tmp_path, tmp_path / "run" / "final", "--split", "test")["examples"] == 8


def test_choosing_best_on_a_test_split_warns(tmp_path, tiny_models, run_cli):
    files = {"train": str(write_rows(tmp_path / "train.csv", 20, 1)), "test": str(write_rows(tmp_path / "t.csv", 8, 2))}
    recipe = files_recipe(tmp_path, str(tiny_models["bert"]), files, data={"eval_split": "test"})
    code, out, err = run_cli("validate", recipe)
    assert code == 0, out + err
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "'test'" in warning[0] and "validation_fraction" in warning[0]


# ----------------------------------------------------------------------------- 15: the positive label


@pytest.mark.parametrize("num_labels, positive", [(2, None), (2, 0), (2, 1), (3, None), (3, 0), (3, 2)])
def test_f1_precision_recall_match_scikit_learn(num_labels, positive):
    from sklearn import metrics as sk

    from softprompt_cli import metrics

    rng = random.Random(num_labels * 10 + (positive or 0))
    for _ in range(5):
        references = [rng.randrange(num_labels) for _ in range(60)]
        predictions = [r if rng.random() < 0.6 else rng.randrange(num_labels) for r in references]
        if positive is None:
            kwargs = {"average": "binary" if num_labels == 2 else "macro"}
        elif num_labels == 2:
            kwargs = {"pos_label": positive}
        else:
            kwargs = {"labels": [positive], "average": "micro"}
        ours = metrics.compute(["f1", "precision", "recall"], predictions, references, num_labels, positive)
        for name, function in (("f1", sk.f1_score), ("precision", sk.precision_score), ("recall", sk.recall_score)):
            assert ours[name] == pytest.approx(function(references, predictions, zero_division=0, **kwargs))
            if positive is not None and num_labels > 2:  # one class against the rest
                alone = function(references, predictions, average=None, labels=list(range(num_labels)),
                                 zero_division=0)[positive]
                assert ours[name] == pytest.approx(alone)


def test_positive_label_reaches_training_and_eval(tmp_path, trained, run_cli):
    from sklearn.metrics import f1_score

    summary = json.loads((trained["folder"] / "run" / "summary.json").read_text())
    report = eval_report(run_cli, tmp_path, trained["checkpoint"])
    assert report["metrics"] == summary["final"]
    code, out, err = run_cli("predict", trained["checkpoint"], "--input", trained["dev"])
    assert code == 0, out + err
    rows = [json.loads(line) for line in out.splitlines()]
    gold, predicted = [r["label"] for r in rows], [r["pred_label"] for r in rows]
    assert report["metrics"]["f1"] == pytest.approx(f1_score(gold, predicted, pos_label="neg"))


def test_unknown_positive_label_is_named(tmp_path, tiny_models, run_cli):
    files = {"train": str(write_rows(tmp_path / "train.csv", 20, 1)), "validation": str(write_rows(tmp_path / "v.csv",
                                                                                                   8, 2))}
    recipe = files_recipe(tmp_path, str(tiny_models["bert"]), files, task={"positive_label": "positive"})
    code, out, err = run_cli("validate", recipe)
    assert code == 2 and "'positive'" in err and "['neg', 'pos']" in err and "Traceback" not in out + err


def test_eval_data_file_keeps_the_glue_task_metrics(tmp_path, tiny_models, run_cli):
    """A GLUE checkpoint's metrics come from its task (MRPC: accuracy and F1); --data replaces the GLUE source,
    but not the metrics the checkpoint was chosen by."""
    from conftest import GLUE_DIR, write_recipe

    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, training={"max_steps": 1})
    assert run_cli("train", recipe)[0] == 0
    rows = (GLUE_DIR / "MRPC" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:13]
    (tmp_path / "slice.tsv").write_text("".join(rows), encoding="utf-8")
    report = eval_report(run_cli, tmp_path, tmp_path / "run" / "final", "--data", tmp_path / "slice.tsv")
    assert report["examples"] == 12 and sorted(report["metrics"]) == ["accuracy", "f1"]


def test_every_data_key_is_placed_for_eval_data():
    """`eval --data FILE` replaces the data source keys, resets the file-format keys and keeps the rest: a new
    DataSection key must be placed in one of these groups, or it would silently carry over (or fall away)."""
    from softprompt_cli.commands.arguments import FILE_KEYS, SOURCE_KEYS
    from softprompt_cli.config.schema import DataSection

    kept = {"text_fields", "label_field", "label_names", "max_length", "max_train_samples", "max_eval_samples"}
    assert set(DataSection.model_fields) == set(SOURCE_KEYS) | set(FILE_KEYS) | kept
