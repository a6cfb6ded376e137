"""A corpus of bad inputs: recipes, data files, checkpoints, adapters and CLI arguments.

Every case must end the way the README promises: exit code 2, a message on stderr, no traceback, and
every file that existed before the command still there with the same bytes (nothing already written
is lost). Each case builds its inputs in its own folder and returns the command line to run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import GLUE_DIR, cli_exit_code

MRPC = GLUE_DIR / "MRPC"
Case = Callable[[Path, dict], list]
CASES: dict[str, Case] = {}


def case(name: str):
    def add(build: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = build
        return build
    return add


def recipe_dict(env: dict, tmp: Path, **sections) -> dict:
    recipe = {
        "model": {"name_or_path": env["bert"]},
        "data": {"glue_task": "mrpc", "dir": str(GLUE_DIR), "max_train_samples": 16, "max_eval_samples": 16},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 4},
        "training": {"batch_size": 8, "max_steps": 1},
        "output": {"dir": str(tmp / "run")},
    }
    for name, values in sections.items():
        if values is None:
            recipe.pop(name, None)
        else:
            recipe.setdefault(name, {}).update(values)
    return recipe


def write(tmp: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def recipe_case(name: str, commands: tuple[str, ...] = ("validate", "train"), **sections):
    """A recipe that is wrong in itself: refused by validate and by train."""
    for command in commands:
        case(f"{command}-{name}")(lambda tmp, env, c=command: [c, write(tmp, recipe_dict(env, tmp, **sections))])


def override_case(name: str, *overrides: str, command: str = "train"):
    case(f"override-{name}")(lambda tmp, env: [command, write(tmp, recipe_dict(env, tmp)), *overrides])


# --- recipes: unknown keys, wrong types, wrong values ----------------------------------------------------
recipe_case("unknown-model-key", model={"nme_or_path": "x"})
recipe_case("unknown-data-key", data={"glue_tsk": "mrpc"})
recipe_case("unknown-task-key", task={"poling": "mean"})
recipe_case("unknown-method-key", method={"num_virtual_token": 4})
recipe_case("unknown-training-key", training={"lrr": 1e-3})
recipe_case("unknown-output-key", output={"dirr": "x"})
recipe_case("unknown-section", extra={"a": 1})
recipe_case("lr-text", training={"lr": "fast"})
recipe_case("lr-infinite", training={"lr": float("inf")})
recipe_case("lr-nan", training={"lr": float("nan")})
recipe_case("batch-size-zero", training={"batch_size": 0})
recipe_case("epochs-negative", training={"epochs": -1, "max_steps": None})
recipe_case("virtual-tokens-zero", method={"num_virtual_tokens": 0})
recipe_case("virtual-tokens-huge", method={"num_virtual_tokens": 100000})
recipe_case("pooling-unknown", task={"pooling": "max"})
recipe_case("method-unknown", method={"name": "lora"})
recipe_case("dtype-unknown", model={"dtype": "int8"})
recipe_case("mixed-precision-unknown", training={"mixed_precision": "fp8"})
recipe_case("task-type-unknown", task={"type": "regression"})
recipe_case("model-missing", model=None)
recipe_case("data-two-sources", data={"dataset": "org/name"})
recipe_case("glue-task-unknown", data={"glue_task": "squad"})
recipe_case("three-text-fields", data={"glue_task": None, "dir": None, "files": {"train": "a.csv"},
                                       "text_fields": ["a", "b", "c"]})
recipe_case("one-label-name", data={"label_names": ["only"]})
recipe_case("metric-unknown", task={"metrics": ["bleu"]})
recipe_case("exact-match-without-target", task={"metrics": ["exact_match"]})
recipe_case("pair-mean-single-text", data={"glue_task": "sst2"}, task={"pooling": "pair_mean"})
recipe_case("init-text-without-text", method={"init": "text"})
recipe_case("prefix-from-missing-checkpoint", method={"name": "prefix_tuning", "init": "from_checkpoint",
                                                      "init_checkpoint": "/nonexistent/prefix"})
recipe_case("prefix-text-with-projection", method={"name": "prefix_tuning", "init": "text", "init_text": "hello",
                                                   "projection": True})
recipe_case("compare-unknown-method", compare={"lora": {"training.lr": 1}})
recipe_case("max-length-zero", data={"max_length": 0})
recipe_case("warmup-ratio-above-one", training={"warmup_ratio": 2.0})
recipe_case("model-folder-missing", model={"name_or_path": "./no/such/model"})
recipe_case("hub-id-offline", model={"name_or_path": "someone/not-packaged-model"})
recipe_case("data-dir-missing", data={"dir": "/nonexistent/glue"})
recipe_case("data-file-missing", data={"glue_task": None, "dir": None, "text_fields": ["text"],
                                       "files": {"train": "/nonexistent/train.csv",
                                                 "validation": "/nonexistent/dev.csv"}})
recipe_case("causal-lm-on-an-encoder", commands=("train",),
            task={"type": "causal_lm", "template": "{sentence} is", "label_words": {"0": " bad", "1": " good"}},
            data={"glue_task": "sst2"})
recipe_case("template-missing-column", task={"type": "causal_lm", "template": "{review} is",
                                             "label_words": {"0": " bad", "1": " good"}}, data={"glue_task": "sst2"})

override_case("not-key-value", "training.lr")
override_case("empty-key", "=3")
override_case("typo-section", "trainng.lr=1e-3")
override_case("bad-value-type", "training.batch_size=many")
override_case("pooling-value", "task.pooling=model: x")
override_case("validate-bad-override", "method.name=adapter", command="validate")


@case("recipe-missing")
def _(tmp, env):
    return ["train", tmp / "nope.yaml"]


@case("recipe-is-a-folder")
def _(tmp, env):
    return ["validate", tmp]


@case("recipe-empty")
def _(tmp, env):
    return ["train", write(tmp, "")]


@case("recipe-a-list")
def _(tmp, env):
    return ["validate", write(tmp, "- a\n- b\n")]


@case("recipe-yaml-syntax")
def _(tmp, env):
    return ["train", write(tmp, "model: {name_or_path: x\ndata: [\n")]


@case("recipe-python-tag")
def _(tmp, env):
    return ["train", write(tmp, f"!!python/object/apply:os.system ['touch {tmp}/pwned']\n")]


@case("recipe-latin1")
def _(tmp, env):
    path = tmp / "recipe.yaml"
    path.write_bytes(yaml.safe_dump(recipe_dict(env, tmp)).encode() + "# caf\xe9\n".encode("latin-1"))
    return ["validate", path]


@case("recipe-binary")
def _(tmp, env):
    path = tmp / "recipe.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return ["train", path]


@case("output-dir-is-a-file")
def _(tmp, env):
    (tmp / "taken").write_text("keep me\n")
    return ["train", write(tmp, recipe_dict(env, tmp, output={"dir": str(tmp / "taken")}))]


@case("validate-output-dir-is-a-file")
def _(tmp, env):
    (tmp / "taken").write_text("keep me\n")
    return ["validate", write(tmp, recipe_dict(env, tmp, output={"dir": str(tmp / "taken")}))]


@case("output-holds-a-run")
def _(tmp, env):
    shutil.copytree(env["run"], tmp / "run")
    return ["train", write(tmp, recipe_dict(env, tmp))]


@case("resume-without-state")
def _(tmp, env):
    return ["train", write(tmp, recipe_dict(env, tmp)), "--resume"]


@case("resume-changed-recipe")
def _(tmp, env):
    shutil.copytree(env["run"], tmp / "run")
    return ["train", write(tmp, recipe_dict(env, tmp, training={"batch_size": 4})), "--resume"]


@case("too-many-positions")
def _(tmp, env):
    return ["train", write(tmp, recipe_dict(env, tmp, data={"max_length": 150}, method={"num_virtual_tokens": 20}))]


@case("validate-too-many-positions")
def _(tmp, env):
    return ["validate", write(tmp, recipe_dict(env, tmp, data={"max_length": 150},
                                              method={"num_virtual_tokens": 20}))]


# --- data files ------------------------------------------------------------------------------------------
def files_recipe(tmp: Path, env: dict, train: Path, validation: Path | None = None, **data) -> Path:
    section = {"glue_task": None, "dir": None, "text_fields": ["text"],
               "files": {"train": str(train), "validation": str(validation or train)}, **data}
    return write(tmp, recipe_dict(env, tmp, data=section, task={"pooling": "mean"}))


def data_case(name: str, file_name: str, content: bytes, **data):
    for command in ("validate", "train"):
        def build(tmp, env, c=command):
            path = tmp / file_name
            path.write_bytes(content)
            return [c, files_recipe(tmp, env, path, **data)]
        case(f"{command}-data-{name}")(build)


data_case("latin1-csv", "train.csv", "text,label\ncaf\xe9 au lait,a\nthe tea,b\n".encode("latin-1"))
data_case("binary-csv", "train.csv", bytes(range(256)) * 8)
data_case("jsonl-array-row", "train.jsonl", b'{"text": "a", "label": "x"}\n["b", "y"]\n')
data_case("jsonl-not-json", "train.jsonl", b'{"text": "a", "label": "x"}\n{text: b}\n')
data_case("empty-label", "train.csv", b"text,label\nfirst,a\nsecond,\nthird,b\n")
data_case("missing-text-column", "train.csv", b"sentence,label\nfirst,a\nsecond,b\n")
data_case("missing-label-column", "train.csv", b"text,class\nfirst,a\nsecond,b\n")
data_case("empty-file", "train.csv", b"")
data_case("header-only", "train.csv", b"text,label\n")
data_case("parquet-random-bytes", "train.parquet", bytes(range(256)) * 8)
data_case("unknown-extension", "train.xlsx", b"text,label\na,b\n")
data_case("single-class", "train.csv", b"text,label\nfirst,a\nsecond,a\n")


@case("data-file-is-a-folder")
def _(tmp, env):
    (tmp / "folder.csv").mkdir()
    return ["validate", files_recipe(tmp, env, tmp / "folder.csv")]


@case("data-label-not-in-label-names")
def _(tmp, env):
    (tmp / "train.csv").write_text("text,label\nfirst,a\nsecond,b\nthird,c\n")
    return ["validate", files_recipe(tmp, env, tmp / "train.csv", label_names=["a", "b"])]


# --- checkpoints and adapters ----------------------------------------------------------------------------
def checkpoint_case(name: str, damage: Callable[[Path], None], source: str = "final"):
    for command in ("eval", "predict", "export"):
        def build(tmp, env, c=command):
            folder = tmp / "ckpt"
            shutil.copytree(env["run"] / source if source != "adapter" else env["adapter"], folder)
            damage(folder)
            extra = {"eval": [], "predict": ["--text", "a", "--text-pair", "b"], "export": [tmp / "out"]}[c]
            if c == "eval" and source == "adapter":
                extra = ["--recipe", write(tmp, recipe_dict(env, tmp))]
            return [c, folder, *extra]
        case(f"{command}-{name}")(build)


def replace_file(name: str, content: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(content)


def truncate(name: str) -> Callable[[Path], None]:
    def cut(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return cut


def recipe_field(**method) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        recipe["method"].update(method)
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return change


checkpoint_case("info-empty-object", replace_file("checkpoint.json", "{}"))
checkpoint_case("info-a-list", replace_file("checkpoint.json", "[]"))
checkpoint_case("info-not-json", replace_file("checkpoint.json", "{not json"))
checkpoint_case("recipe-invalid-yaml", replace_file("recipe.yaml", "model: [\n"))
checkpoint_case("recipe-python-tag", replace_file("recipe.yaml", "!!python/object/apply:os.system ['true']\n"))
checkpoint_case("recipe-not-a-recipe", replace_file("recipe.yaml", "model: {}\n"))
checkpoint_case("recipe-more-tokens-than-tensors", recipe_field(num_virtual_tokens=20))
checkpoint_case("weights-truncated", truncate("softprompt.safetensors"))
checkpoint_case("weights-missing", lambda folder: (folder / "softprompt.safetensors").unlink())
checkpoint_case("adapter-config-not-json", replace_file("adapter_config.json", "{oops"), source="adapter")
checkpoint_case("adapter-config-a-list", replace_file("adapter_config.json", "[1, 2]"), source="adapter")
checkpoint_case("adapter-weights-truncated", truncate("adapter_model.safetensors"), source="adapter")


@case("eval-lora-adapter")
def _(tmp, env):
    folder = tmp / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    return ["eval", folder, "--recipe", write(tmp, recipe_dict(env, tmp))]


@case("eval-missing-checkpoint")
def _(tmp, env):
    return ["eval", tmp / "nowhere"]


@case("eval-a-file")
def _(tmp, env):
    return ["eval", write(tmp, "x: 1\n", "file.txt")]


@case("eval-another-base-model")
def _(tmp, env):
    return ["eval", env["run"] / "final", "--model", env["gpt2"]]


@case("eval-adapter-without-recipe")
def _(tmp, env):
    return ["eval", env["adapter"]]


@case("export-unknown-format")
def _(tmp, env):
    return ["export", env["run"] / "final", tmp / "out", "--format", "onnx"]


@case("export-what-peft-cannot-express")
def _(tmp, env):
    return ["export", env["run"] / "final", tmp / "out"]


# --- predict inputs --------------------------------------------------------------------------------------
def predict_case(name: str, file_name: str, content: bytes, *extra: str):
    def build(tmp, env):
        path = tmp / file_name
        path.write_bytes(content)
        return ["predict", env["run"] / "final", "--input", path, *extra]
    case(f"predict-{name}")(build)


PAIR = b'"#1 String","#2 String"\n'
predict_case("latin1-tsv", "in.tsv", "#1 String\t#2 String\ncaf\xe9\tth\xe9\n".encode("latin-1"))
predict_case("latin1-csv", "in.csv", PAIR + "caf\xe9,th\xe9\n".encode("latin-1"))
predict_case("latin1-jsonl", "in.jsonl", '{"#1 String": "caf\xe9", "#2 String": "x"}\n'.encode("latin-1"))
predict_case("random-bytes-jsonl", "in.jsonl", bytes(range(256)) * 4)
predict_case("random-bytes-tsv", "in.tsv", bytes(range(256)) * 4)
predict_case("null-text", "in.jsonl", b'{"#1 String": null, "#2 String": "x"}\n')
predict_case("list-text", "in.jsonl", b'{"#1 String": ["a"], "#2 String": "x"}\n')
predict_case("array-row", "in.jsonl", b'["a", "b"]\n')
predict_case("empty-file", "in.csv", b"")
predict_case("missing-columns", "in.csv", b"a,b\n1,2\n")
predict_case("unknown-extension", "in.xml", b"<a/>")
predict_case("unknown-task", "in.jsonl", b'{"task": "nope", "#1 String": "a", "#2 String": "b"}\n')
predict_case("one-text-for-a-pair-task", "in.csv", b"text\nhello\n", "--text-field", "text")


@case("predict-missing-input")
def _(tmp, env):
    return ["predict", env["run"] / "final", "--input", tmp / "missing.csv"]


@case("predict-input-is-a-folder")
def _(tmp, env):
    return ["predict", env["run"] / "final", "--input", tmp]


@case("predict-no-input")
def _(tmp, env):
    return ["predict", env["run"] / "final"]


@case("predict-input-and-text")
def _(tmp, env):
    return ["predict", env["run"] / "final", "--input", write(tmp, "text\na\n", "in.csv"), "--text", "a"]


@case("predict-pair-count")
def _(tmp, env):
    return ["predict", env["run"] / "final", "--text", "a", "--text", "b", "--text-pair", "c"]


@case("predict-missing-checkpoint")
def _(tmp, env):
    return ["predict", tmp / "nowhere", "--text", "a"]


@case("predict-duplicate-names")
def _(tmp, env):
    return ["predict", f"x={env['run'] / 'final'}", f"x={env['run'] / 'best'}", "--text", "a", "--text-pair", "b"]


@case("predict-bad-output-extension")
def _(tmp, env):
    return ["predict", env["run"] / "final", "--text", "a", "--text-pair", "b", "--output", tmp / "out.xml"]


# --- other commands --------------------------------------------------------------------------------------
@case("init-prefix-text-and-file")
def _(tmp, env):
    return ["init-prefix-from-text", "--model", env["llama"], "--text", "a", "--text-file", write(tmp, "b", "t.txt"),
            "--num-virtual-tokens", "2", "-o", tmp / "p"]


@case("init-prefix-neither")
def _(tmp, env):
    return ["init-prefix-from-text", "--model", env["llama"], "--num-virtual-tokens", "2", "-o", tmp / "p"]


@case("init-prefix-missing-text-file")
def _(tmp, env):
    return ["init-prefix-from-text", "--model", env["llama"], "--text-file", tmp / "none.txt",
            "--num-virtual-tokens", "2", "-o", tmp / "p"]


@case("init-prefix-empty-text")
def _(tmp, env):
    return ["init-prefix-from-text", "--model", env["llama"], "--text", "  ", "--num-virtual-tokens", "2",
            "-o", tmp / "p"]


@case("init-prefix-text-too-short")
def _(tmp, env):
    return ["init-prefix-from-text", "--model", env["llama"], "--text", "hi", "--num-virtual-tokens", "40",
            "-o", tmp / "p"]


@case("init-prefix-output-not-empty")
def _(tmp, env):
    (tmp / "p").mkdir()
    (tmp / "p" / "keep.txt").write_text("mine\n")
    return ["init-prefix-from-text", "--model", env["llama"], "--text", "some text here", "--num-virtual-tokens",
            "2", "-o", tmp / "p"]


@case("init-prefix-missing-model")
def _(tmp, env):
    return ["init-prefix-from-text", "--model", "./no/model", "--text", "some text", "--num-virtual-tokens", "2",
            "-o", tmp / "p"]


@case("compare-unknown-method")
def _(tmp, env):
    return ["compare", write(tmp, recipe_dict(env, tmp)), "--methods", "lora", "-o", tmp / "cmp"]


@case("compare-output-not-empty")
def _(tmp, env):
    (tmp / "cmp").mkdir()
    (tmp / "cmp" / "report.md").write_text("an earlier report\n")
    return ["compare", write(tmp, recipe_dict(env, tmp)), "-o", tmp / "cmp"]


@case("compare-missing-recipe")
def _(tmp, env):
    return ["compare", tmp / "nope.yaml", "-o", tmp / "cmp"]


# --- the corpus run ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """A trained tiny-BERT run (pair_mean: not exportable) and a PEFT adapter exported from another run."""
    root = tmp_path_factory.mktemp("corpus")
    paths = {kind: str(path) for kind, path in tiny_models.items()}

    def train(folder: Path, **sections) -> Path:
        recipe = write(folder, recipe_dict(paths, folder, **sections))
        assert cli_exit_code("train", recipe) == 0
        return folder / "run"

    (root / "a").mkdir()
    (root / "b").mkdir()
    run = train(root / "a", task={"pooling": "pair_mean"})
    exportable = train(root / "b", task={"pooling": "model", "prompt_position": "start"})
    assert cli_exit_code("export", exportable / "final", root / "adapter") == 0
    assert (run / "final").is_dir() and (root / "adapter" / "adapter_config.json").is_file()
    return {**paths, "run": run, "adapter": root / "adapter"}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_cleanly(name, env, tmp_path, run_cli):
    argv = CASES[name](tmp_path, env)
    before = snapshot(tmp_path)
    code, out, err = run_cli(*argv)
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    assert err.strip(), "no message"
    after = snapshot(tmp_path)
    lost = {path for path, digest in before.items() if after.get(path) != digest}
    assert not lost, f"changed or removed: {sorted(lost)}"
    assert not (tmp_path / "pwned").exists()
