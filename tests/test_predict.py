"""`softprompt predict`: several checkpoints on one frozen model, rows of different tasks in the same batch."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import GLUE_DIR, cli_exit_code, write_recipe


def train(run_cli, tmp_path, name, model, method, **sections):
    folder = tmp_path / name
    folder.mkdir()
    recipe = write_recipe(folder, model, method, training={"max_steps": 2}, **sections)
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    return folder / "run" / "final"


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    """Four tiny-BERT checkpoints: a pair task, a single-text task, a 3-label task read by the model's own
    head, and a prefix-tuning task (the last two cannot share a forward pass with the first two)."""
    tmp_path = tmp_path_factory.mktemp("checkpoints")
    labelled = tmp_path / "three.csv"
    labelled.write_text("text,label\n" + "".join(f"example number {i},{'xyz'[i % 3]}\n" for i in range(30)))

    def run_cli(*args):
        return cli_exit_code(*args), "", ""

    bert = str(tiny_models["bert"])
    return {
        "mrpc": train(run_cli, tmp_path, "mrpc", bert, {"name": "prompt_tuning"}, task={"pooling": "pair_mean"}),
        "sst2": train(run_cli, tmp_path, "sst2", bert, {"name": "prompt_tuning"}, task={"pooling": "mean"},
                      data={"glue_task": "sst2"}),
        "three": train(run_cli, tmp_path, "three", bert, {"name": "prompt_tuning"},
                       data={"glue_task": None, "dir": None, "files": {"train": str(labelled),
                                                                        "validation": str(labelled)},
                             "text_fields": ["text"]}),
        "prefix": train(run_cli, tmp_path, "prefix", bert, {"name": "prefix_tuning", "projection": True,
                                                            "encoder_hidden_size": 8}),
    }


ROWS = [
    {"task": "mrpc", "text": "the company said profits rose", "text_pair": "profits went up, the firm said"},
    {"task": "sst2", "text": "a wonderful, moving film"},
    {"task": "three", "text": "example number 4"},
    {"task": "prefix", "text": "one sentence", "text_pair": "another sentence that is longer"},
    {"task": "sst2", "text": "dull"},
    {"task": "mrpc", "text": "short", "text_pair": "a somewhat longer second sentence here"},
]


def test_mixed_batch_equals_each_checkpoint_alone(tmp_path, checkpoints, run_cli):
    mixed_input = tmp_path / "mixed.jsonl"
    refs = [f"{name}={path}" for name, path in checkpoints.items()]
    fields = {"mrpc": ["text", "text_pair"], "sst2": ["text"], "three": ["text"], "prefix": ["text", "text_pair"]}
    renamed = []
    for row in ROWS:  # each row carries the column names its task's recipe reads
        names = {"mrpc": ["#1 String", "#2 String"], "sst2": ["sentence"], "three": ["text"],
                 "prefix": ["#1 String", "#2 String"]}[row["task"]]
        renamed.append({"task": row["task"], **{n: row[f] for n, f in zip(names, fields[row["task"]])}})
    mixed_input.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    code, out, err = run_cli("predict", *refs, "--input", mixed_input, "--output", tmp_path / "out.jsonl",
                             "--batch-size", "8")
    assert code == 0, out + err
    mixed = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["pred_task"] for r in mixed] == [r["task"] for r in ROWS]

    for name, path in checkpoints.items():
        own = [r for r in renamed if r["task"] == name]
        single_input = tmp_path / f"{name}.jsonl"
        single_input.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "task"}) + "\n" for r in own))
        code, out, err = run_cli("predict", str(path), "--input", single_input, "--batch-size", "1")
        assert code == 0, out + err
        alone = [json.loads(line) for line in out.splitlines()]
        together = [r for r in mixed if r["pred_task"] == name]
        assert [r["pred_label"] for r in alone] == [r["pred_label"] for r in together]
        for a, b in zip(alone, together):
            assert a["pred_probabilities"].keys() == b["pred_probabilities"].keys()
            assert all(abs(a["pred_probabilities"][k] - b["pred_probabilities"][k]) < 1e-5
                       for k in a["pred_probabilities"])


def test_predict_mrpc_dev_file_writes_one_row_per_input(tmp_path, checkpoints, run_cli):
    code, out, err = run_cli("predict", checkpoints["mrpc"], "--input", GLUE_DIR / "MRPC" / "dev.tsv",
                             "--output", tmp_path / "dev.csv")
    assert code == 0, out + err
    lines = (tmp_path / "dev.csv").read_text().splitlines()
    assert len(lines) == 1 + 408
    assert "pred_p_equivalent" in lines[0] and "pred_label" in lines[0]
    assert all(",equivalent," in line or ",not_equivalent," in line for line in lines[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch can use")
def test_predict_on_a_gpu_equals_the_cpu(checkpoints, run_cli):
    pairs = [arg for row in ROWS if "text_pair" in row
             for arg in ("--text", row["text"], "--text-pair", row["text_pair"])]
    refs = [f"{name}={checkpoints[name]}" for name in ("mrpc", "prefix")]
    answers = {}
    for device in ("cpu", "cuda"):
        code, out, err = run_cli("predict", *refs, *pairs, "--device", device)
        assert code == 0, out + err
        answers[device] = [json.loads(line) for line in out.splitlines()]
    assert [r["pred_label"] for r in answers["cpu"]] == [r["pred_label"] for r in answers["cuda"]]
    for a, b in zip(answers["cpu"], answers["cuda"]):
        assert all(abs(a["pred_probabilities"][k] - b["pred_probabilities"][k]) < 1e-4 for k in a["pred_probabilities"])


@pytest.mark.parametrize("args, message", [
    (["--text", "a"], "does not exist"),  # checkpoint folder missing (replaced below)
    (["--input", "missing.jsonl"], "does not exist"),
    (["--input", "empty.jsonl"], "no rows"),
    (["--input", "unknown_task.jsonl"], "not one of the loaded checkpoints"),
    (["--input", "no_column.jsonl"], "has no"),
    (["--text", "only one text for a pair task"], "reads 2 text(s)"),
    (["--text", "a", "--device", "gpu"], "--device 'gpu' is not auto, cpu, cuda or cuda:N"),
    (["--text", "a", "--device", "cuda:7"], "torch cannot use that GPU"),  # no machine here has 8 GPUs
])
def test_predict_bad_input(tmp_path, checkpoints, run_cli, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "unknown_task.jsonl").write_text(json.dumps({"task": "nope", "sentence": "x"}) + "\n")
    (tmp_path / "no_column.jsonl").write_text(json.dumps({"other": "x"}) + "\n")
    checkpoint = {"does not exist": tmp_path / "no_such_checkpoint", "reads 2 text(s)": checkpoints["mrpc"]}.get(
        message, checkpoints["sst2"]) if args[0] == "--text" else checkpoints["sst2"]
    code, out, err = run_cli("predict", checkpoint, *args)
    assert code == 2, out + err
    assert message in err and "Traceback" not in out + err


def test_a_run_on_glue_dir_records_it_so_its_checkpoints_read_the_same_columns(tmp_path, tiny_models, run_cli,
                                                                             monkeypatch):
    """A recipe without data.dir trained through $GLUE_DIR: its checkpoints keep reading the GLUE tsv columns
    (#1 String, #2 String) where $GLUE_DIR is unset, instead of switching to the Hub's (sentence1, sentence2)."""
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                          training={"max_steps": 1, "batch_size": 8})
    fields = yaml.safe_load(recipe.read_text())
    del fields["data"]["dir"]
    recipe.write_text(yaml.safe_dump(fields))
    monkeypatch.setenv("GLUE_DIR", str(GLUE_DIR))
    code, _, err = run_cli("train", str(recipe))
    assert code == 0, err
    monkeypatch.delenv("GLUE_DIR")
    checkpoint = tmp_path / "run" / "final"
    assert yaml.safe_load((checkpoint / "recipe.yaml").read_text())["data"]["dir"] == str(GLUE_DIR.resolve())
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join((GLUE_DIR / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines(True)[:3]))
    code, out, err = run_cli("predict", str(checkpoint), "--input", str(rows))
    assert code == 0, err
    assert len(out.splitlines()) == 2
