"""`softprompt predict` and `eval` import only what they use: not the data-set, dataframe, metrics, serving or PEFT
stacks, each of which would add to every command's start-up (README, Start-up)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, cli_exit_code, write_recipe

# Run as `python -c REPORT_IMPORTS ARGS...`: the CLI with ARGS, then the top-level packages it imported.
REPORT_IMPORTS = """
import atexit, json, sys
atexit.register(lambda: print("IMPORTED", json.dumps(sorted({name.split(".")[0] for name in sys.modules}))))
from softprompt_cli.cli import main
sys.argv = ["softprompt", *sys.argv[1:]]
main()
"""
UNUSED_BY_PREDICT_AND_EVAL = {"datasets", "pandas", "sklearn", "fastapi", "uvicorn", "starlette", "peft",
                              "matplotlib", "tensorboard"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("startup")
    recipe = write_recipe(folder, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                          training={"max_steps": 1}, data={"max_train_samples": 8, "max_eval_samples": 8})
    assert cli_exit_code("train", recipe) == 0
    return folder / "run" / "final"


def imported_by(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return set(json.loads(done.stdout.rsplit("IMPORTED", 1)[1]))


@pytest.mark.parametrize("command", [["predict", "--text", "a cat", "--text-pair", "a dog"], ["eval"]])
def test_predict_and_eval_import_only_what_they_use(checkpoint, command):
    imported = imported_by(command[0], checkpoint, *command[1:])
    assert {"torch", "transformers"} <= imported  # they do run the model
    assert not imported & UNUSED_BY_PREDICT_AND_EVAL
