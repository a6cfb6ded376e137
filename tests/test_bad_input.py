"""Nothing lost, nothing silent: undecodable, malformed or empty inputs are refused with exit code 2 and a
message naming the file (and line or row), never with a traceback or a silently wrong result."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import NO_HEAVY_IMPORTS, REPO, write_recipe

RANDOM_BYTES = bytes(random.Random(0).randrange(256) for _ in range(4096))


def refused(result: tuple[int, str, str], *needles: str) -> str:
    code, out, err = result
    assert code == 2, out + err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def files_recipe(tmp_path: Path, model: str, train: Path, validation: Path | None = None, **data) -> Path:
    return write_recipe(tmp_path, model, {"name": "prompt_tuning"}, data={
        "glue_task": None, "dir": None, "text_fields": ["text"],
        "files": {"train": str(train), "validation": str(validation or train)}, **data})


@pytest.fixture
def bert(tiny_models) -> str:
    return str(tiny_models["bert"])


# ----------------------------------------------------------------------------- 5: not UTF-8, not a table


def test_latin1_recipe(tmp_path, run_cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("model: {name_or_path: x}\n# caf\xe9 au lait\n".encode("latin-1"))
    refused(run_cli("validate", recipe), str(recipe), "line 2", "UTF-8")


def test_latin1_data_file_and_data_encoding(tmp_path, run_cli, bert):
    train = tmp_path / "train.csv"
    train.write_bytes("text,label\nplain,a\ncaf\xe9,b\n".encode("latin-1"))
    recipe = files_recipe(tmp_path, bert, train)
    refused(run_cli("validate", recipe), str(train), "line 3", "data.encoding: latin-1")
    code, out, err = run_cli("validate", recipe, "data.encoding=latin-1")
    assert code == 0, out + err
    refused(run_cli("validate", recipe, "data.encoding=no-such-codec"), "data: encoding 'no-such-codec'")


@pytest.mark.parametrize("name", ["train.parquet", "train.jsonl", "train.tsv"])
def test_random_bytes_data_file(tmp_path, run_cli, bert, name):
    train = tmp_path / name
    train.write_bytes(RANDOM_BYTES)
    refused(run_cli("validate", files_recipe(tmp_path, bert, train, label_names=["a", "b"])), str(train))


@pytest.mark.parametrize("name, content", [
    ("in.tsv", "sentence\ngood\ncaf\xe9\n".encode("latin-1")),
    ("in.csv", "sentence\ngood\ncaf\xe9\n".encode("latin-1")),
    ("in.jsonl", '{"sentence": "good"}\n{"sentence": "caf\xe9"}\n'.encode("latin-1")),
    ("in.tsv", RANDOM_BYTES),
    ("in.csv", RANDOM_BYTES),
    ("in.jsonl", RANDOM_BYTES),
    ("in.parquet", RANDOM_BYTES),
], ids=["latin1-tsv", "latin1-csv", "latin1-jsonl", "bytes-tsv", "bytes-csv", "bytes-jsonl", "bytes-parquet"])
def test_predict_input_not_readable(tmp_path, run_cli, name, content):
    source = tmp_path / name
    source.write_bytes(content)
    # The input is read before any checkpoint or model is loaded: a missing checkpoint never comes into play.
    err = refused(run_cli("predict", tmp_path / "no_checkpoint", "--input", source), str(source))
    if content is not RANDOM_BYTES:
        assert "line 3" in err or "line 2" in err
    assert "data.encoding" not in err and "data.format" not in err


# ----------------------------------------------------------------------------- 7b: a jsonl row that is no object


@pytest.mark.parametrize("line", ['["a", "b"]', '"just text"', "3", "null"])
def test_jsonl_row_not_an_object(tmp_path, run_cli, bert, line):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "fine", "label": "a"}\n' + line + "\n")
    refused(run_cli("validate", files_recipe(tmp_path, bert, train)), str(train), "line 2", "JSON object")


# ----------------------------------------------------------------------------- 7c: remote code


def test_model_needing_remote_code_is_refused_without_running_it(tmp_path, run_cli):
    folder = tmp_path / "custom_model"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.XModel"},
                                                    "model_type": "x-custom"}))
    (folder / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('the code ran')\n")
    recipe = write_recipe(tmp_path, str(folder), {"name": "prompt_tuning"}, training={"max_steps": 1})
    refused(run_cli("train", recipe), str(folder), "model.trust_remote_code: true", "trust")
    assert not marker.exists()


# ----------------------------------------------------------------------------- 9: empty cells


@pytest.mark.parametrize("name, content, needle", [
    ("train.csv", "text,label\none,a\ntwo,\nthree,b\n", "empty label"),
    ("train.csv", "text,label\none,a\n,b\nthree,b\n", "'text' is empty"),
    ("train.jsonl", '{"text": "one", "label": "a"}\n{"text": "two", "label": null}\n', "empty label"),
    ("train.jsonl", '{"text": "one", "label": "a"}\n{"text": null, "label": "b"}\n', "'text' is empty"),
    ("train.jsonl", '{"text": "one", "label": "a"}\n{"text": ["x"], "label": "b"}\n', "not a text"),
], ids=["csv-label", "csv-text", "jsonl-null-label", "jsonl-null-text", "jsonl-list-text"])
@pytest.mark.parametrize("names", [None, ["a", "b"]], ids=["inferred-labels", "given-labels"])
def test_empty_cells_in_training_data(tmp_path, run_cli, bert, name, content, needle, names):
    train = tmp_path / name
    train.write_text(content)
    recipe = files_recipe(tmp_path, bert, train, **({"label_names": names} if names else {}))
    refused(run_cli("validate", recipe), str(train), "row 2", needle)


@pytest.fixture(scope="module")
def sst2_checkpoint(tiny_models, tmp_path_factory) -> Path:
    from softprompt_cli.cli import main

    folder = tmp_path_factory.mktemp("sst2")
    recipe = write_recipe(folder, str(tiny_models["bert"]), {"name": "prompt_tuning"}, task={"pooling": "mean"},
                          data={"glue_task": "sst2"}, training={"max_steps": 1})
    saved, sys.argv = sys.argv, ["softprompt", "train", str(recipe)]
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code
    finally:
        sys.argv = saved
    return folder / "run" / "final"


@pytest.mark.parametrize("value, what", [(None, "is empty"), ("", "is empty"), (["a"], "not a text"),
                                         ({"a": 1}, "not a text"), (True, "not a text")])
def test_predict_refuses_rows_without_text(tmp_path, run_cli, sst2_checkpoint, value, what):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"sentence": "a fine film"}) + "\n" + json.dumps({"sentence": value}) + "\n")
    refused(run_cli("predict", sst2_checkpoint, "--input", source), str(source), "row 2", "'sentence'", what)


@pytest.mark.parametrize("name, content, line, fields", [
    ("in.csv", "sentence,label\na fine film,1\nit is good, really good,1\n", 3, 3),  # an unquoted comma
    ("in.csv", "sentence,label\na fine film\n", 2, 1),
    ("in.tsv", "sentence\tlabel\r\na fine\tfilm\t1\r\n", 2, 3),
])
def test_predict_refuses_rows_that_do_not_fit_the_header(tmp_path, run_cli, sst2_checkpoint, name, content, line,
                                                           fields):
    """A row with more cells than the header lost them without a word (and in training data a text's end became a
    label); one with fewer lost its columns."""
    source = tmp_path / name
    source.write_text(content)
    refused(run_cli("predict", sst2_checkpoint, "--input", source), str(source), f"line {line} has {fields} fields",
            "2 columns (sentence, label)")


def test_predict_writes_parquet_timestamps_and_bytes_as_text(tmp_path, run_cli, sst2_checkpoint):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    when = datetime.datetime(2024, 5, 1, 12, 30)
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"sentence": ["a fine film", "dull"], "when": [when, when], "raw": [b"ok", b"\xff"]}),
                   source)
    code, out, err = run_cli("predict", sst2_checkpoint, "--input", source)
    assert code == 0, out + err
    rows = [json.loads(line) for line in out.splitlines()]
    stamp = "2024-05-01T12:30:00"
    assert [(r["when"], r["raw"]) for r in rows] == [(stamp, "ok"), (stamp, "base64:/w==")]
    code, _, err = run_cli("predict", sst2_checkpoint, "--input", source, "--output", tmp_path / "out.csv")
    assert code == 0, err
    assert "2024-05-01T12:30:00,ok" in (tmp_path / "out.csv").read_text()


def test_predict_tsv_output_reads_back_as_its_input(tmp_path, run_cli, sst2_checkpoint):
    """tsv is read with quotes as text (GLUE's own files hold them), so predict writes it unquoted; a tab or line
    break inside a text cannot be written so and becomes a space, with a note."""
    from softprompt_cli.data.sources import read_table

    source = tmp_path / "in.tsv"
    source.write_text('sentence\nhe said "wow" , a fine film\n"quoted from the start"\n', encoding="utf-8")
    output = tmp_path / "out.tsv"
    code, _, err = run_cli("predict", sst2_checkpoint, "--input", source, "--output", output)
    assert code == 0, err
    assert [r["sentence"] for r in read_table(output, recipe=False)] == \
        [r["sentence"] for r in read_table(source, recipe=False)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"sentence": "a\tfine\nfilm"}) + "\n")
    code, _, err = run_cli("predict", sst2_checkpoint, "--input", jsonl, "--output", output)
    assert code == 0 and "1 text(s) held tabs or line breaks" in err
    assert [r["sentence"] for r in read_table(output, recipe=False)] == ["a fine film"]


def test_checkpoints_that_load_the_base_model_differently_are_not_mixed(tmp_path, run_cli, sst2_checkpoint):
    """One loaded base model serves all the checkpoints: in another dtype, one's results would depend on which came
    first on the command line."""
    import shutil

    from softprompt_cli.artifacts.checkpoint import RECIPE_FILE

    other = tmp_path / "bf16"
    shutil.copytree(sst2_checkpoint, other)
    recipe = yaml.safe_load((other / RECIPE_FILE).read_text())
    recipe["model"]["dtype"] = "bfloat16"
    (other / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    for order in ([sst2_checkpoint, other], [other, sst2_checkpoint]):
        refused(run_cli("predict", f"a={order[0]}", f"b={order[1]}", "--text", "a fine film"),
                "load their base model differently", "model.dtype", "bfloat16", "run them separately")


def test_predict_reads_numbers_as_text(tmp_path, run_cli, sst2_checkpoint):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"sentence": 42}) + "\n" + json.dumps({"sentence": 1.5}) + "\n")
    code, out, err = run_cli("predict", sst2_checkpoint, "--input", source)
    assert code == 0, out + err
    assert [json.loads(line)["sentence"] for line in out.splitlines()] == [42, 1.5]


# ----------------------------------------------------------------------------- 10: wording, and refusing early


def test_data_file_that_is_a_folder(tmp_path, run_cli, bert):
    folder = tmp_path / "data"
    folder.mkdir()
    err = refused(run_cli("validate", files_recipe(tmp_path, bert, folder)), str(folder), "is a folder")
    assert "does not exist" not in err


def test_predict_unknown_extension_names_what_predict_reads(tmp_path, run_cli):
    source = tmp_path / "rows.xml"
    source.write_text("<rows/>")
    err = refused(run_cli("predict", tmp_path / "no_checkpoint", "--input", source), str(source), ".csv", ".tsv",
                  ".jsonl", ".parquet")
    assert "data.format" not in err


def test_predict_input_that_is_a_folder(tmp_path, run_cli):
    refused(run_cli("predict", tmp_path / "no_checkpoint", "--input", tmp_path), str(tmp_path), "is a folder")



@pytest.mark.parametrize("argv, needle", [
    (["predict", "ckpt", "--input", "missing.jsonl"], "'missing.jsonl' does not exist"),
    (["predict", "ckpt", "--input", "missing.jsonl", "--text", "a"], "not both"),
    (["predict", "ckpt"], "not neither"),
    (["predict", "ckpt", "--text", "a", "--text-pair", "b", "--text-pair", "c"], "one --text-pair per --text"),
    (["eval", "missing_checkpoint"], "'missing_checkpoint' does not exist"),
    (["eval", "missing_checkpoint", "--recipe", "missing.yaml"], "'missing_checkpoint' does not exist"),
], ids=["predict-missing-input", "predict-both", "predict-neither", "predict-pairs", "eval-missing",
        "eval-missing-with-recipe"])
def test_cheap_refusals_do_not_import_torch(tmp_path, argv, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, *argv], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exit 2" in result.stdout, result.stdout + result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_eval_recipe_problem_is_found_before_torch(tmp_path):
    """eval reads its --recipe (a torch-free step) before importing the evaluation code."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    recipe = tmp_path / "data.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "dataa": {}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, "eval", str(checkpoint), "--recipe", str(recipe)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "exit 2" in result.stdout, result.stdout + result.stderr
    assert str(recipe) in result.stderr and "Traceback" not in result.stderr
