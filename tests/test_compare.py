"""softprompt compare: all methods side by side; a failing method is reported, not fatal."""

from __future__ import annotations

import json

import yaml
from conftest import write_recipe


def test_compare_reports_every_method_and_survives_a_failure(tmp_path, tiny_models, run_cli):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "p_tuning", "encoder_hidden_size": 8},
                          training={"max_steps": 2, "log_steps": 1}, task={"pooling": "mean"})
    data = yaml.safe_load(recipe.read_text())
    # 500 virtual tokens + 128 tokens exceed the tiny model's 160 positions: only the run can tell.
    data["compare"] = {"prefix_tuning": {"method.num_virtual_tokens": 500},
                       "prompt_tuning": {"training.lr": 0.05}}
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("compare", recipe, "--seeds", "2", "-o", tmp_path / "cmp")
    assert code == 0, out + err
    report = (tmp_path / "cmp" / "report.md").read_text()
    for method in ("prompt_tuning", "p_tuning"):
        assert f"| {method} |" in report
    assert "| prefix_tuning | failed: " in report and "exceeds the model's 160 positions" in report
    assert (tmp_path / "cmp" / "report.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    methods = summary["recipes"][str(recipe)]["methods"]
    assert [len(methods[m]) for m in ("prompt_tuning", "p_tuning", "prefix_tuning")] == [2, 2, 2]
    assert all("summary" in run for run in methods["p_tuning"])
    assert all(r["summary"]["output_dir"].endswith(f"seed{s}") for r, s in zip(methods["p_tuning"], (42, 43)))
    used = yaml.safe_load((tmp_path / "cmp" / "recipe" / "prompt_tuning" / "seed42" / "compare_recipe.yaml")
                          .read_text())
    assert used["training"]["lr"] == 0.05 and used["method"] == {"name": "prompt_tuning", "num_virtual_tokens": 4}


def test_compare_bad_input(tmp_path, tiny_models, run_cli):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"})
    code, out, err = run_cli("compare", recipe, "--methods", "prompt_tuning,lora", "-o", tmp_path / "cmp")
    assert code == 2 and "lora is not a method" in err and "Traceback" not in out + err
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "old.txt").write_text("keep")
    code, out, err = run_cli("compare", recipe, "-o", tmp_path / "cmp")
    assert code == 2 and "--overwrite" in err and (tmp_path / "cmp" / "old.txt").read_text() == "keep"
    data = yaml.safe_load(recipe.read_text())
    data["compare"] = {"lora": {"training.lr": 1}}
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("compare", recipe, "-o", tmp_path / "other")
    assert code == 2 and "lora is not a method" in err
