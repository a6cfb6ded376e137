"""Train, interrupt (Ctrl-C), resume: the same final weights and metrics as an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import interrupt_at_optimizer_step, logged_without_timings, write_recipe
from safetensors.torch import load_file

METHODS = {
    "p_tuning_lstm": {"name": "p_tuning", "encoder": "lstm", "encoder_hidden_size": 8},
    "prefix_projection": {"name": "prefix_tuning", "projection": True, "encoder_hidden_size": 8},
}


@pytest.mark.parametrize("stop_at", [4, 6, 9])  # mid-epoch, at an epoch's end, mid second epoch
@pytest.mark.parametrize("method", METHODS)
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_models, run_cli, monkeypatch, method, stop_at):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    common = {"training": {"epochs": 2, "batch_size": 8}, "task": {"pooling": "mean"}}
    straight = write_recipe(tmp_path / "a", str(tiny_models["bert"]), METHODS[method], **common)
    stopped = write_recipe(tmp_path / "b", str(tiny_models["bert"]), METHODS[method], **common)
    assert run_cli("train", straight)[0] == 0

    with monkeypatch.context() as patch:
        interrupt_at_optimizer_step(patch, stop_at)
        code, out, err = run_cli("train", stopped)
    assert code == 130, out + err
    assert f"stopped at step {stop_at}" in err and "--resume" in err and "Traceback" not in out + err
    assert not (tmp_path / "b" / "run" / "final").exists()

    code, out, err = run_cli("train", stopped, "--resume")
    assert code == 0, out + err
    assert f"resumed at step {stop_at}" in out

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for name in ("final", "best"):
        weights_a = load_file(a / name / "softprompt.safetensors")
        weights_b = load_file(b / name / "softprompt.safetensors")
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            torch.testing.assert_close(weights_b[key], weights_a[key], atol=1e-6, rtol=0)
    final_a, final_b = (json.loads((run / "summary.json").read_text())["final"] for run in (a, b))
    assert final_b == final_a
    assert logged_without_timings(b) == logged_without_timings(a)
    # The training form is saved for resuming: the LSTM / projection MLP, not only their output.
    assert any(".encoder." in key for key in load_file(b / "state" / "params.safetensors"))


def test_resume_without_state_or_with_another_recipe_is_refused(tmp_path, tiny_models, run_cli):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, training={"max_steps": 2})
    code, out, err = run_cli("train", recipe, "--resume")
    assert code == 2 and "no training state" in err
    assert run_cli("train", recipe)[0] == 0
    code, out, err = run_cli("train", recipe, "--resume", "training.lr=0.5")
    assert code == 2 and "training.lr" in err and "Traceback" not in out + err
    code, out, err = run_cli("train", recipe, "--resume", "training.max_steps=4")
    assert code == 0, out + err
    assert json.loads((tmp_path / "run" / "final" / "checkpoint.json").read_text())["step"] == 4
