"""Nothing lost, nothing silent: concurrent runs, crashes while replacing a folder, a full disk, divergence.

Each test reproduces one fault for real (a second process holding the output folder, a process killed between
the two renames of a folder replacement, save_file raising ENOSPC, a learning rate that turns the loss into
NaN) and checks that the run ends with a clean message and exit code 2 (or recovers by itself), and that
what was saved before is intact.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, write_recipe
from safetensors.torch import load_file

from softprompt_cli.artifacts import checkpoint
from softprompt_cli.artifacts.checkpoint import (
    COMPLETE_MARKER,
    LOCK_FILE,
    atomic_folder,
    output_lock,
    read_checkpoint,
    recover_folder,
    write_checkpoint,
)
from softprompt_cli.errors import UserError
from softprompt_cli.training import resume
from softprompt_cli.training.metrics_log import MetricsLog

LSTM = {"name": "p_tuning", "encoder": "lstm", "encoder_hidden_size": 8}
# 48 training rows in batches of 8: 6 steps per epoch, 12 in all; state every 2 steps and every epoch.
COMMON = {"training": {"epochs": 2, "batch_size": 8, "save_state_steps": 2}, "task": {"pooling": "mean"}}


def strict_json_lines(path: Path) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it (Python's json accepts NaN and Infinity unless told not to)."""

    def reject(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def comparable(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "examples_per_s")}
            for r in strict_json_lines(run / "metrics.jsonl")]


def hidden_entries(folder: Path) -> list[str]:
    """Staging folders, .old folders, lock files: what a clean run leaves none of."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_same_run(a: Path, b: Path) -> None:
    """b (interrupted somehow, then resumed) ended exactly where the uninterrupted a did."""
    for name in ("final", "best"):
        weights_a, weights_b = (load_file(run / name / "softprompt.safetensors") for run in (a, b))
        assert weights_a.keys() == weights_b.keys()
        for key in weights_a:
            torch.testing.assert_close(weights_b[key], weights_a[key], atol=1e-6, rtol=0)
    records_a, records_b = comparable(a), comparable(b)
    assert [r.keys() for r in records_b] == [r.keys() for r in records_a]
    for record_a, record_b in zip(records_a, records_b):
        # Not bitwise: MKL on AVX-512 picks float32 kernels by buffer alignment, and the resumed process allocates
        # anew (a gradient norm moved in its 8th digit).
        assert all(same_value(record_b[key], record_a[key]) for key in record_a), (record_b, record_a)


def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
    return a == b


def python_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------- 1. one run per output folder


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that claims `out` (as a running `softprompt train` does) and waits to be killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from softprompt_cli.artifacts.checkpoint import output_lock
        with output_lock(Path({str(out)!r})):
            print("locked", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=python_env(), stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_folder_in_use_is_refused_and_a_killed_holder_releases_it(tmp_path, tiny_models, run_cli):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, training={"max_steps": 2})
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        for extra in ([], ["--resume"]):  # a resumed run claims the folder the same way
            code, stdout, err = run_cli("train", recipe, *extra)
            assert code == 2, stdout + err
            assert f"is in use by another softprompt run (pid {holder.pid})" in " ".join(err.split())
            assert "output.dir" in err and "Traceback" not in stdout + err
            assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, the kernel drops the lock
        holder.wait()
    assert (out / LOCK_FILE).exists()
    code, stdout, err = run_cli("train", recipe)
    assert code == 0, stdout + err
    assert (out / "final").is_dir() and hidden_entries(out) == []  # released (and removed) at the end


def test_the_lock_is_exclusive_and_released_on_errors(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match="in use by another softprompt run"):
            with output_lock(out):  # a second open file description conflicts, even in one process
                pass
    assert not out.exists()  # created by the claim, left empty: removed with it
    with pytest.raises(RuntimeError):
        with output_lock(out):
            (out / "kept.txt").write_text("x")
            raise RuntimeError("boom")
    with output_lock(out):  # released despite the exception
        pass
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]


def test_stopped_run_releases_the_folder(tmp_path, tiny_models, run_cli, monkeypatch):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, **COMMON)
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # a user's Ctrl-C
        return result

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        code, out, err = run_cli("train", recipe)
    assert code == 130, out + err
    assert hidden_entries(tmp_path / "run") == []
    code, out, err = run_cli("train", recipe, "--resume")
    assert code == 0, out + err


# ----------------------------------------------------------------------------- 2. crash while replacing a folder


def killed_between_renames(recipe: Path, name: str, occurrence: int) -> subprocess.CompletedProcess:
    """`softprompt train` in a process that dies (no cleanup, as on a power cut or SIGKILL) right after the
    `occurrence`-th replacement of <output>/`name` moved the old folder aside, before the new one is in place."""
    code = textwrap.dedent(f"""
        import os, pathlib, sys
        original, seen = pathlib.Path.rename, []
        def rename(self, target):
            target = pathlib.Path(target)
            if target.name == {name!r} and self.name.endswith(".tmp") and not target.exists():
                seen.append(self)
                if len(seen) == {occurrence}:
                    os._exit(137)
            return original(self, target)
        pathlib.Path.rename = rename
        sys.argv = ["softprompt", "train", {str(recipe)!r}]
        from softprompt_cli.cli import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=python_env(), capture_output=True, text=True,
                          timeout=300)


def test_crash_between_the_renames_of_the_state_is_recovered_on_resume(tmp_path, tiny_models, run_cli):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_recipe(tmp_path / "a", str(tiny_models["bert"]), LSTM, **COMMON)
    crashed = write_recipe(tmp_path / "b", str(tiny_models["bert"]), LSTM, **COMMON)
    assert run_cli("train", straight)[0] == 0

    done = killed_between_renames(crashed, "state", occurrence=2)  # the state of step 4 replacing step 2's
    assert done.returncode == 137, done.stdout[-2000:] + done.stderr[-2000:]
    run = tmp_path / "b" / "run"
    assert not (run / "state").exists() and (run / ".state.old").is_dir()
    [staged] = [p for p in run.iterdir() if p.name.startswith(".state.") and p.name.endswith(".tmp")]
    assert (staged / COMPLETE_MARKER).is_file()
    assert (run / LOCK_FILE).exists()  # the killed run's: no longer locked
    (run / ".state.abcdefgh.tmp").mkdir()  # and an unfinished write of another crash
    (run / ".state.abcdefgh.tmp" / "params.safetensors").write_bytes(b"half")

    code, out, err = run_cli("train", crashed, "--resume")
    assert code == 0, out + err
    assert "resumed at step 4" in out  # the complete new state, not the old one
    assert_same_run(tmp_path / "a" / "run", run)
    assert hidden_entries(run) == []


def test_only_the_old_folder_left_is_recovered_on_resume(tmp_path, tiny_models, run_cli, monkeypatch):
    """The crash came before the new state was complete: the previous state (in .state.old) is resumed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_recipe(tmp_path / "a", str(tiny_models["bert"]), LSTM, **COMMON)
    crashed = write_recipe(tmp_path / "b", str(tiny_models["bert"]), LSTM, **COMMON)
    assert run_cli("train", straight)[0] == 0
    with monkeypatch.context() as patch:
        original, calls = torch.optim.AdamW.step, {"n": 0}

        def step(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 4:
                signal.raise_signal(signal.SIGINT)
            return result

        patch.setattr(torch.optim.AdamW, "step", step)
        assert run_cli("train", crashed)[0] == 130
    run = tmp_path / "b" / "run"
    (run / "state").rename(run / ".state.old")
    (run / ".state.a1b2c3d4.tmp").mkdir()  # incomplete: no marker
    (run / ".state.a1b2c3d4.tmp" / "params.safetensors").write_bytes(b"half")

    code, out, err = run_cli("train", crashed, "--resume")
    assert code == 0, out + err
    assert "resumed at step 4" in out
    assert_same_run(tmp_path / "a" / "run", run)
    assert hidden_entries(run) == []


def make_folder(path: Path, text: str, complete: bool = False) -> Path:
    path.mkdir()
    (path / "content.txt").write_text(text)
    if complete:
        (path / COMPLETE_MARKER).write_text("complete\n")
    return path


def test_recover_folder_prefers_a_complete_staging_folder_then_the_old_one(tmp_path):
    target = tmp_path / "best"
    make_folder(tmp_path / ".best.old", "old")
    make_folder(tmp_path / ".best.abcdefgh.tmp", "unfinished")
    make_folder(tmp_path / ".best.zzzzzzzz.tmp", "new", complete=True)
    make_folder(tmp_path / ".best.x.12345678.tmp", "another folder's staging")  # not best's
    recover_folder(target)
    assert (target / "content.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.x.12345678.tmp", "best"]

    for leftover in tmp_path.iterdir():
        if leftover.name.startswith("."):
            leftover.rename(tmp_path / "elsewhere")
    target.rename(tmp_path / ".best.old")
    make_folder(tmp_path / ".best.abcdefgh.tmp", "unfinished")
    recover_folder(target)
    assert (target / "content.txt").read_text() == "new"  # the previous version, from .best.old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "elsewhere"]
    recover_folder(tmp_path / "nothing")  # nothing to recover: nothing happens
    assert not (tmp_path / "nothing").exists()


def test_a_failed_replacement_is_rolled_back(tmp_path, monkeypatch):
    target = tmp_path / "state"
    with atomic_folder(target) as staging:
        (staging / "content.txt").write_text("first")
    assert sorted(p.name for p in target.iterdir()) == ["content.txt"]  # the marker stays behind

    original = Path.rename

    def rename(self, destination):
        if Path(destination) == target and self.name.endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")  # after the old folder was moved aside
        return original(self, destination)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(UserError, match=r"could not write .*state.*EIO"):
        with atomic_folder(target) as staging:
            (staging / "content.txt").write_text("second")
    assert (target / "content.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_files_and_folders_are_fsynced_before_and_after_the_renames(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def rename(self, to):
        events.append(("rename", str(to)))
        return real_rename(self, to)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    target = tmp_path / "best"
    for _ in range(2):  # the first write creates best/, the second replaces it
        events.clear()
        write_checkpoint(target, {"w": torch.ones(2)}, {"label_names": []}, "recipe: 1\n")
    synced = [path for kind, path in events if kind == "fsync"]
    first_rename = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    before = {Path(p).name for p in synced[:first_rename]}
    assert {"softprompt.safetensors", "checkpoint.json", "recipe.yaml", COMPLETE_MARKER} <= before
    assert any(name.startswith(".best.") and name.endswith(".tmp") for name in before)  # the staging folder
    assert [kind for kind, _ in events[first_rename:first_rename + 2]] == ["rename", "rename"]
    assert str(tmp_path) in synced[first_rename:]  # the parent, after the renames


# ----------------------------------------------------------------------------- 3. disk full


def fail_after(calls: int, real, error: Exception | None = None):
    """A save_file that works `calls` times, then finds the disk full (an OSError, or `error`)."""
    count = {"n": 0}

    def save_file(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise error or OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return save_file


def assert_clean_disk_error(code: int, out: str, err: str, folder: Path) -> None:
    message = " ".join(err.split())
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert "No space left on device (ENOSPC)" in message and str(folder) in message
    assert "Free disk space" in message and "output.dir" in message


def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, tiny_models, run_cli, monkeypatch):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, **COMMON)
    monkeypatch.setattr(checkpoint, "save_file", fail_after(1, checkpoint.save_file))  # best/ of epoch 1 only
    code, out, err = run_cli("train", recipe)
    run = tmp_path / "run"
    assert_clean_disk_error(code, out, err, run)
    info, _, tensors = read_checkpoint(run / "best")
    assert info["step"] == 6 and all(torch.isfinite(t).all() for t in tensors.values())
    assert not (run / "final").exists()
    assert hidden_entries(run) == []  # staging removed, lock released


def test_disk_full_while_writing_the_state_keeps_the_last_state(tmp_path, tiny_models, run_cli, monkeypatch):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                          training={"epochs": 2, "batch_size": 8}, task={"pooling": "mean"})
    # A state is 3 files: the first state (end of epoch 1) is written, the second fails.
    with monkeypatch.context() as patch:
        patch.setattr(resume, "save_file", fail_after(3, resume.save_file))
        code, out, err = run_cli("train", recipe)
    run = tmp_path / "run"
    assert_clean_disk_error(code, out, err, run / "state")
    assert resume.load_state(run / "state")["progress"]["step"] == 6
    assert hidden_entries(run) == []
    code, out, err = run_cli("train", recipe, "--resume")  # space freed: nothing was lost
    assert code == 0, out + err
    assert "resumed at step 6" in out


# ----------------------------------------------------------------------------- 4. non-finite numbers


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_recipe_numbers_are_refused(tmp_path, tiny_models, run_cli, value):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"})
    for command in ("validate", "train"):
        code, out, err = run_cli(command, recipe, f"training.lr={value}")
        assert code == 2, out + err
        assert "training.lr: Input should be a finite number" in err and "Traceback" not in out + err
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_the_step_and_writes_nothing_non_finite(tmp_path, tiny_models, run_cli):
    # On tiny BERT, lr 1e30 turns the loss into NaN within a few steps (without the check: exit 0, NaN weights).
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, training={"lr": 1e30},
                          task={"pooling": "mean"})
    code, out, err = run_cli("train", recipe)
    message = " ".join(err.split())
    assert code == 2, out + err
    assert "Traceback" not in out + err
    step = int(re.search(r"training diverged at step (\d+): the loss is nan", message).group(1))
    assert "training.lr=1e+30" in message and "lower it" in message
    run = tmp_path / "run"
    records = strict_json_lines(run / "metrics.jsonl")
    assert records and all(r["step"] < step for r in records)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    for name in ("best", "final", "state"):
        if (run / name).exists():
            assert all(torch.isfinite(t).all() for p in (run / name).glob("*.safetensors")
                       for t in load_file(p).values())
    assert hidden_entries(run) == []


def test_a_non_finite_gradient_stops_the_run_and_keeps_what_was_saved(tmp_path, tiny_models, run_cli, monkeypatch):
    """The loss stays finite, its gradient does not (step 8, in epoch 2): best/ and state/ of epoch 1 stay."""
    from softprompt_cli.model.soft_prompt import SoftPromptModel

    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"},
                          training={"epochs": 2, "batch_size": 8}, task={"pooling": "mean"})
    original, calls = SoftPromptModel.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 8:
                output["loss"].register_hook(lambda grad: grad * math.inf)
        return output

    monkeypatch.setattr(SoftPromptModel, "forward", forward)
    code, out, err = run_cli("train", recipe)
    assert code == 2, out + err
    assert "training diverged at step 8: the prompt gradient norm is" in " ".join(err.split())
    run = tmp_path / "run"
    assert read_checkpoint(run / "best")[0]["step"] == 6
    assert resume.load_state(run / "state")["progress"]["step"] == 6
    assert not (run / "final").exists()
    strict_json_lines(run / "metrics.jsonl")


def test_write_checkpoint_refuses_non_finite_tensors(tmp_path):
    target = tmp_path / "best"
    write_checkpoint(target, {"w": torch.ones(2)}, {"label_names": []}, "recipe: 1\n")
    with pytest.raises(UserError, match=r"w hold NaN or infinite values.*Lower training.lr"):
        write_checkpoint(target, {"w": torch.tensor([1.0, math.nan])}, {"label_names": []}, "recipe: 2\n")
    assert load_file(target / "softprompt.safetensors")["w"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_metrics_log_writes_strict_json(tmp_path):
    logged = []
    accelerator = SimpleNamespace(is_main_process=True, log=lambda values, step: logged.append(values))
    with MetricsLog(tmp_path / "metrics.jsonl", accelerator) as log:
        log.write({"step": 1, "loss": math.nan, "lr": math.inf, "prompt_grad_norm": 2.0,
                   "eval": {"accuracy": 0.5, "f1": -math.inf}})
    [record] = strict_json_lines(tmp_path / "metrics.jsonl")
    assert record == {"step": 1, "loss": None, "lr": None, "prompt_grad_norm": 2.0,
                      "eval": {"accuracy": 0.5, "f1": None}}
    assert logged == [{"prompt_grad_norm": 2.0, "eval/accuracy": 0.5}]


def test_disk_full_as_safetensors_reports_it_is_a_clean_error(tmp_path, tiny_models, run_cli, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (this text, seen on a full tmpfs), not an
    OSError: the same message and exit 2, the last good best/ kept."""
    from safetensors import SafetensorError

    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, **COMMON)
    full = SafetensorError("I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", fail_after(1, checkpoint.save_file, full))
    code, out, err = run_cli("train", recipe)
    assert code == 2 and "Traceback" not in out + err
    assert "No space left on device" in err and "ENOSPC" in err and "Free disk space" in err
    assert read_checkpoint(tmp_path / "run" / "best")[0]["step"] == 6
