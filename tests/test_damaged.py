"""Nothing lost, nothing silent: damaged checkpoints and adapters give one clear message (eval, predict, export),
and `validate` catches what `train` would refuse later (too many positions, output.dir a file, non-finite
numbers), all without a traceback."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
from conftest import write_recipe

from softprompt_cli.commands.validate import max_positions

DAMAGED = "is damaged"
RETRAIN = "train again"
REEXPORT = "Export it again"


def _in_process(*args: str) -> int:
    from softprompt_cli.cli import main

    saved, sys.argv = sys.argv, ["softprompt", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return 0


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny-BERT checkpoint (the model's own head, prompt at the start: exportable), its recipe and its
    PEFT adapter."""
    folder = tmp_path_factory.mktemp("damaged")
    recipe = write_recipe(folder, str(tiny_models["bert"]), {"name": "prompt_tuning"}, training={"max_steps": 1},
                          task={"pooling": "model", "prompt_position": "start"})
    assert _in_process("train", recipe) == 0
    assert _in_process("export", folder / "run" / "final", folder / "adapter", "--format", "peft") == 0
    return {"checkpoint": folder / "run" / "final", "recipe": recipe, "adapter": folder / "adapter"}


def _edit_recipe(folder, change):
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    change(recipe)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def _edit_tensors(folder, change, name="softprompt.safetensors"):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / name)
    change(tensors)
    save_file(tensors, folder / name)


def _edit_info(folder, change):
    info = json.loads((folder / "checkpoint.json").read_text())
    change(info)
    (folder / "checkpoint.json").write_text(json.dumps(info))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _add_tensor(tensors):
    import torch

    tensors["prompt.extra"] = torch.zeros(3)


def _three_class_head(tensors):
    import torch

    tensors.update({"base.classifier.weight": torch.zeros(3, 32), "base.classifier.bias": torch.zeros(3)})


def _set_tokens(n):
    return lambda recipe: recipe["method"].update(num_virtual_tokens=n)


CHECKPOINT_DAMAGE = {
    # name: (damage(folder, tmp_path), what the message says)
    "info-empty-object": (lambda f, t: (f / "checkpoint.json").write_text("{}"), "label_names"),
    "info-list": (lambda f, t: (f / "checkpoint.json").write_text("[]"), "JSON list, not an object"),
    "info-not-json": (lambda f, t: (f / "checkpoint.json").write_text('{"label_names": '), "not valid JSON"),
    "info-no-labels": (lambda f, t: _edit_info(f, lambda i: i.pop("label_names")), "label_names"),
    "info-no-base-model": (lambda f, t: _edit_info(f, lambda i: i.pop("base_model")), "base_model"),
    "info-missing": (lambda f, t: (f / "checkpoint.json").unlink(), "incomplete (checkpoint.json missing)"),
    "recipe-not-yaml": (lambda f, t: (f / "recipe.yaml").write_text("model: [unclosed\n"), "not valid (safe) YAML"),
    "recipe-python-tag": (lambda f, t: (f / "recipe.yaml").write_text(
        f'!!python/object/apply:os.system ["touch {t / "executed"}"]\n'), "not valid (safe) YAML"),
    "recipe-a-list": (lambda f, t: (f / "recipe.yaml").write_text("- model\n- data\n"), "holds a list"),
    "recipe-not-a-recipe": (lambda f, t: _edit_recipe(f, lambda r: r["training"].update(lr="fast")),
                            "not a valid recipe (training.lr"),
    "recipe-more-tokens": (lambda f, t: _edit_recipe(f, _set_tokens(8)), "prompt.embedding has shape [4, 32] where"),
    "tensor-extra": (lambda f, t: _edit_tensors(f, _add_tensor), "prompt.extra is not a tensor of that model"),
    "tensor-missing": (lambda f, t: _edit_tensors(f, lambda d: d.pop("base.classifier.bias")),
                       "base.classifier.bias is missing"),
    "head-mis-shaped": (lambda f, t: _edit_tensors(f, _three_class_head),
                        "base.classifier.weight has shape [3, 32] where the model needs [2, 32]"),
    "weights-truncated": (lambda f, t: _truncate(f / "softprompt.safetensors"),
                          "softprompt.safetensors cannot be read"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
def test_damaged_checkpoint_is_one_clear_message_everywhere(tmp_path, trained, run_cli, damage):
    folder = tmp_path / "final"
    shutil.copytree(trained["checkpoint"], folder)
    change, what = CHECKPOINT_DAMAGE[damage]
    change(folder, tmp_path)
    for command in (["eval", folder], ["predict", folder, "--text", "a", "--text-pair", "b"],
                    ["export", folder, tmp_path / "adapter", "--format", "peft"]):
        code, out, err = run_cli(*command)
        message = " ".join(err.split())
        assert code == 2, (command[0], out, err)
        assert f"checkpoint {str(folder)!r} {DAMAGED}: " in message and what in message, (command[0], err)
        assert RETRAIN in message and "Traceback" not in out + err, (command[0], err)
    assert not (tmp_path / "executed").exists()  # the python tag was refused, never run
    assert not (tmp_path / "adapter").exists()


def _write_config(folder, text):
    (folder / "adapter_config.json").write_text(text)


def _edit_config(folder, change):
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    _write_config(folder, json.dumps(config))


ADAPTER_DAMAGE = {
    "config-not-json": (lambda f: _write_config(f, "{peft_type: PROMPT_TUNING"),
                        "adapter_config.json is not valid JSON"),
    "config-not-object": (lambda f: _write_config(f, '"PROMPT_TUNING"'), "JSON str, not an object"),
    "config-no-tokens": (lambda f: _edit_config(f, lambda c: c.pop("num_virtual_tokens")), "num_virtual_tokens"),
    "config-more-tokens": (lambda f: _edit_config(f, lambda c: c.update(num_virtual_tokens=8)),
                           "fit the model its adapter_config.json describes"),
    "weights-truncated": (lambda f: _truncate(f / "adapter_model.safetensors"),
                          "adapter_model.safetensors cannot be read"),
    "weights-missing": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "labels-not-json": (lambda f: (f / "label_names.json").write_text("[a, b"), "label_names.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", ADAPTER_DAMAGE)
def test_damaged_peft_adapter_is_one_clear_message(tmp_path, trained, run_cli, damage):
    folder = tmp_path / "adapter"
    shutil.copytree(trained["adapter"], folder)
    change, what = ADAPTER_DAMAGE[damage]
    change(folder)
    for command in (["eval", folder, "--recipe", trained["recipe"]], ["predict", folder, "--text", "a"]):
        code, out, err = run_cli(*command)
        message = " ".join(err.split())
        assert code == 2, (command[0], out, err)
        assert f"checkpoint {str(folder)!r} {DAMAGED}: " in message and what in message, (command[0], err)
        assert REEXPORT in message and "Traceback" not in out + err, (command[0], err)


def test_undamaged_copies_still_work(tmp_path, trained, run_cli):
    """The checks refuse damage only: the same folders, copied unchanged, evaluate and predict."""
    code, out, err = run_cli("predict", trained["checkpoint"], "--text", "a", "--text-pair", "b")
    assert code == 0, out + err
    code, out, err = run_cli("predict", trained["adapter"], "--text", "a")
    assert code == 0, out + err


def test_not_a_checkpoint_folder_says_so(tmp_path, run_cli):
    code, out, err = run_cli("eval", tmp_path)
    assert code == 2 and "is not a checkpoint folder" in err and "Traceback" not in out + err


# ----------------------------------------------------------------------------- validate


def _validate(run_cli, recipe, *overrides):
    code, out, err = run_cli("validate", recipe, *overrides)
    assert "Traceback" not in out + err
    return code, " ".join((out + err).split())


@pytest.mark.parametrize("kind", ["bert", "gpt2"])  # max_position_embeddings / n_positions in config.json
def test_validate_catches_too_many_positions(tmp_path, tiny_models, run_cli, kind):
    recipe = write_recipe(tmp_path, str(tiny_models[kind]), {"name": "prompt_tuning"}, training={"max_steps": 1})
    assert _validate(run_cli, recipe, "data.max_length=156")[0] == 0  # 4 + 156 = 160: fits exactly
    code, message = _validate(run_cli, recipe, "data.max_length=157")
    assert code == 2 and "(4) + data.max_length (157) = 161 exceeds the model's 160 positions" in message
    code, out, err = run_cli("train", recipe, "data.max_length=157")  # what validate predicts, train does
    assert code == 2 and "exceeds the model's 160 positions" in err and "Traceback" not in out + err


def test_max_positions_reads_nested_and_renamed_keys():
    assert max_positions({"max_position_embeddings": 512}) == 512
    assert max_positions({"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}) == 1024
    assert max_positions({"model_type": "t5", "n_positions": 512}) is None  # relative attention: no limit
    assert max_positions({"text_config": {"max_position_embeddings": 4096}, "vision_config": {}}) == 4096
    assert max_positions({"text_config": {}, "decoder": {}}) is None  # ambiguous, as in transformers
    assert max_positions({"hidden_size": 8}) is None  # not said: train checks with the loaded config
    assert max_positions({"max_position_embeddings": True}) is None


def test_validate_skips_positions_without_a_config_json(tmp_path, tiny_models):
    """A GGUF model's config is inside the GGUF file: nothing is read (and the model check reports the file)."""
    from softprompt_cli.commands.validate import position_problem
    from softprompt_cli.config.load import load_recipe

    gguf_folder = tmp_path / "gguf"
    gguf_folder.mkdir()
    (gguf_folder / "model.gguf").write_bytes(b"GGUF")
    recipe = write_recipe(tmp_path, str(gguf_folder), {"name": "prompt_tuning"})
    assert position_problem(load_recipe(recipe, ["model.gguf_file=model.gguf", "data.max_length=100000"])) is None
    same_folder = load_recipe(recipe, [f"model.name_or_path={tiny_models['bert']}", "data.max_length=100000"])
    assert "exceeds the model's 160 positions" in position_problem(same_folder)


def test_validate_refuses_an_output_dir_that_is_a_file_with_every_other_problem(tmp_path, tiny_models, run_cli):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"})
    (tmp_path / "taken").write_text("not a folder")
    code, message = _validate(run_cli, recipe, f"output.dir={tmp_path / 'taken'}", "data.max_length=500")
    assert code == 2 and "2 problem(s)" in message
    assert f"output.dir: {str(tmp_path / 'taken')!r} is a file, not a folder" in message
    assert "move the file away" in message and "exceeds the model's 160 positions" in message
    code, message = _validate(run_cli, recipe, f"output.dir={tmp_path / 'taken' / 'run'}")
    assert code == 2 and "which is a file, not a folder" in message
    assert _validate(run_cli, recipe, f"output.dir={tmp_path / 'new' / 'run'}")[0] == 0


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_validate_refuses_non_finite_numbers(tmp_path, tiny_models, run_cli, value):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"})
    code, message = _validate(run_cli, recipe, f"training.lr={value}")
    assert code == 2 and "training.lr: Input should be a finite number" in message
