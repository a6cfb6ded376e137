"""Mixed precision: `training.mixed_precision: auto` (with the hardware check mocked), the precision a checkpoint
records, and eval and predict following it unless `--precision` says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NO_HEAVY_IMPORTS, REPO, cli_exit_code, write_recipe

from softprompt_cli import precision
from softprompt_cli.commands.arguments import PRECISION_OPTIONS

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True),
                                                      (False, True, True)])
def test_cpu_computes_bf16_natively_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.computes_bf16_natively(CPU) is native


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_computes_bf16_natively_from_ampere_on(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.computes_bf16_natively(torch.device("cuda", 0)) is native


def test_this_cpu_check_agrees_with_its_flags():
    """The check reads the CPU's own flags (this machine's answer, whatever it is, matches /proc/cpuinfo)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    assert precision.computes_bf16_natively(CPU) == ("avx512_bf16" in flags or "amx_tile" in flags)


@pytest.mark.parametrize("setting, native, resolved", [("auto", True, "bf16"), ("auto", False, "no"),
                                                       ("no", True, "no"), ("bf16", False, "bf16"),
                                                       ("fp16", True, "fp16")])
def test_auto_resolves_to_bf16_only_where_native(monkeypatch, setting, native, resolved):
    monkeypatch.setattr(precision, "computes_bf16_natively", lambda device: native)
    assert precision.resolve(setting, CPU) == resolved


def test_precision_options_are_the_ones_inference_knows():
    assert set(PRECISION_OPTIONS) == {"checkpoint", *precision.OPTION_PRECISIONS}


def spy_autocast(monkeypatch, module, name: str) -> list[torch.dtype | None]:
    """Replace module.name by a wrapper that records, at each call, the CPU autocast's dtype (None: off)."""
    seen = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Tiny-BERT checkpoints trained with mixed_precision auto on a machine said to compute bf16 (so: bf16),
    and with no."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "computes_bf16_natively", lambda device: True)
        for name, setting in (("auto", "auto"), ("fp32", "no")):
            folder = tmp_path_factory.mktemp(name)
            recipe = write_recipe(folder, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                                  task={"pooling": "pair_mean"},
                                  training={"max_steps": 2, "mixed_precision": setting})
            assert cli_exit_code("train", recipe) == 0
            runs[name] = folder / "run"
    return runs


def test_checkpoint_and_summary_record_what_auto_resolved_to(trained):
    for folder in (trained["auto"] / "best", trained["auto"] / "final", trained["auto"]):
        assert yaml.safe_load((folder / "recipe.yaml").read_text())["training"]["mixed_precision"] == "bf16"
    assert json.loads((trained["auto"] / "summary.json").read_text())["mixed_precision"] == "bf16"
    assert yaml.safe_load((trained["fp32"] / "final" / "recipe.yaml").read_text())["training"][
        "mixed_precision"] == "no"


@pytest.mark.parametrize("native, ran", [(True, "bf16"), (False, "no")])
def test_auto_training_announces_records_and_evaluates_in_what_ran(tiny_models, tmp_path, monkeypatch, run_cli,
                                                                   native, ran):
    import softprompt_cli.training.loop as loop

    monkeypatch.setattr(precision, "computes_bf16_natively", lambda device: native)
    seen = spy_autocast(monkeypatch, loop, "evaluate")
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                          training={"max_steps": 2, "mixed_precision": "auto"})
    code, out, err = run_cli("train", recipe)
    assert code == 0, out + err
    assert f"precision {precision.display_name(ran)})" in out
    assert yaml.safe_load((tmp_path / "run" / "final" / "recipe.yaml").read_text())["training"][
        "mixed_precision"] == ran
    assert seen and set(seen) == {torch.bfloat16 if native else None}


PAIR = ["--text", "the company said profits rose", "--text-pair", "profits went up, the firm said"]


@pytest.mark.parametrize("run, option, expected", [
    ("auto", "checkpoint", torch.bfloat16),  # follows the checkpoint
    ("fp32", "checkpoint", None),
    ("auto", "fp32", None),  # overridden
    ("fp32", "bf16", torch.bfloat16),
])
def test_predict_follows_the_checkpoint_unless_told(trained, monkeypatch, run_cli, run, option, expected):
    import softprompt_cli.inference.batches as batches

    monkeypatch.setattr(precision, "computes_bf16_natively", lambda device: False)
    seen = spy_autocast(monkeypatch, batches, "predict_batch")
    code, out, err = run_cli("predict", trained[run] / "final", *PAIR, "--precision", option)
    assert code == 0, out + err
    assert seen and set(seen) == {expected}
    # Following a bf16 checkpoint where bf16 is emulated says how to run faster; asking for bf16 does not.
    assert ("--precision fp32 runs it faster" in err) == (run == "auto" and option == "checkpoint")
    assert json.loads(out)["pred_label"] in ("equivalent", "not_equivalent")


def test_predict_keeps_checkpoints_of_different_precisions_in_separate_batches(trained):
    from softprompt_cli.inference.tasks import load_tasks

    tasks, _ = load_tasks([f"bf16={trained['auto'] / 'final'}", f"fp32={trained['fp32'] / 'final'}"])
    assert {name: task.precision for name, task in tasks.items()} == {"bf16": "bf16", "fp32": "no"}
    assert tasks["bf16"].batch_key != tasks["fp32"].batch_key


@pytest.mark.parametrize("option, expected", [("checkpoint", "bf16"), ("fp32", "fp32")])
def test_eval_follows_the_checkpoint_unless_told(trained, monkeypatch, run_cli, tmp_path, option, expected):
    import softprompt_cli.commands.evaluate as evaluate

    seen = spy_autocast(monkeypatch, evaluate, "evaluate")
    code, out, err = run_cli("eval", trained["auto"] / "best", "--precision", option, "--output",
                             tmp_path / "report.json")
    assert code == 0, out + err
    assert f"examples, {expected})" in out
    assert json.loads((tmp_path / "report.json").read_text())["precision"] == expected
    assert seen == [torch.bfloat16 if expected == "bf16" else None]


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_bad_precision_is_refused_before_torch(tmp_path, command):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    argv = [command, str(checkpoint), "--precision", "fp8", *(["--text", "x"] if command == "predict" else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "exit 2" in result.stdout, result.stdout + result.stderr
    assert "--precision 'fp8' is not one of checkpoint, fp32, bf16" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_may_resume_in_another_precision(tmp_path):
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.training.resume import check_resumable

    path = write_recipe(tmp_path, "some/model", {"name": "prompt_tuning"}, training={"mixed_precision": "bf16"})
    saved = load_recipe(path).model_dump(mode="json")
    check_resumable(saved, load_recipe(path, ["training.mixed_precision=no"]), tmp_path)


@pytest.mark.parametrize("pooling", ["mean", "pair_mean"])
def test_a_bfloat16_base_model_feeds_our_float32_head(tiny_models, tmp_path, run_cli, pooling):
    """model.dtype bfloat16 with a head of ours (mean pooling): the pooled states reach the float32 head in its own
    dtype, in training, evaluation and predict."""
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, task={"pooling": pooling},
                          training={"max_steps": 2, "batch_size": 4, "eval_batch_size": 8})
    fields = yaml.safe_load(recipe.read_text())
    fields["model"]["dtype"] = "bfloat16"
    recipe.write_text(yaml.safe_dump(fields))
    code, _, err = run_cli("train", str(recipe))
    assert code == 0, err
    checkpoint = tmp_path / "run" / "final"
    code, out, err = run_cli("predict", str(checkpoint), "--text", "The cat sat.", "--text-pair", "A cat sat.")
    assert code == 0, err
    assert sum(json.loads(out.splitlines()[0])["pred_probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
