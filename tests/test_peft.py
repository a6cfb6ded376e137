"""PEFT interop both ways: exported checkpoints load in PEFT with the same logits, and PEFT adapters
evaluate and predict here with PEFT's logits."""

from __future__ import annotations

import pytest
import torch

from conftest import write_recipe

peft = pytest.importorskip("peft")

EXPORTABLE = {
    "prompt_tuning": {"name": "prompt_tuning"},
    "prefix_tuning": {"name": "prefix_tuning"},
    "prefix_tuning_projection": {"name": "prefix_tuning", "projection": True, "encoder_hidden_size": 8},
    "p_tuning_mlp": {"name": "p_tuning", "encoder": "mlp", "encoder_hidden_size": 8},
    "p_tuning_lstm": {"name": "p_tuning", "encoder": "lstm", "encoder_hidden_size": 8},
}
PAIRS = (["the first sentence of a pair", "short"], ["its second sentence", "another, longer second sentence"])


def peft_logits(base_path, adapter, texts, pairs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    with torch.no_grad():
        return model(**tokenizer(texts, pairs, padding=True, return_tensors="pt")).logits


def our_logits(folder, texts, pairs, data_recipe=None):
    from softprompt_cli.evaluation import load_trained

    _, model, tokenizer, _ = load_trained(folder, data_recipe=data_recipe)
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(texts, pairs, padding=True, return_tensors="pt"))["logits"]


@pytest.mark.parametrize("variant", EXPORTABLE)
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_exported_checkpoint_gives_the_same_logits_in_peft(tmp_path, tiny_models, run_cli, kind, variant):
    recipe = write_recipe(tmp_path, str(tiny_models[kind]), EXPORTABLE[variant],
                          task={"pooling": "model", "prompt_position": "start"}, training={"max_steps": 3})
    assert run_cli("train", recipe)[0] == 0
    code, out, err = run_cli("export", tmp_path / "run" / "final", tmp_path / "adapter", "--format", "peft")
    assert code == 0, out + err
    # PEFT's decoder classifiers read the last position: compare on rows without padding there.
    rows = (PAIRS[0][:1], PAIRS[1][:1]) if kind == "gpt2" else PAIRS
    expected = peft_logits(tiny_models[kind], tmp_path / "adapter", *rows)
    torch.testing.assert_close(our_logits(tmp_path / "run" / "final", *rows), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix_tuning", "p_tuning_mlp"])
def test_exported_causal_lm_checkpoint_gives_the_same_next_token_logits_in_peft(tmp_path, tiny_models, run_cli,
                                                                                variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt_cli.evaluation import load_trained

    recipe = write_recipe(tmp_path, str(tiny_models["llama"]), EXPORTABLE[variant], training={"max_steps": 2},
                          data={"glue_task": "sst2"}, task={"type": "causal_lm", "template": "{sentence} It was",
                                                            "label_words": {"0": " bad", "1": " good"}})
    assert run_cli("train", recipe)[0] == 0
    code, out, err = run_cli("export", tmp_path / "run" / "final", tmp_path / "adapter")
    assert code == 0, out + err
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    row = tokenizer(["a fine film It was"], return_tensors="pt")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
                                           tmp_path / "adapter").eval()
    _, ours, _, _ = load_trained(tmp_path / "run" / "final")
    with torch.no_grad():
        expected = model(**row).logits[:, -1]  # PEFT's prompt-tuning logits also cover the virtual tokens
        actual = ours.lm_head(ours.encode(row["input_ids"], row["attention_mask"], None, ours.prompt()).states[:, -1])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_export_refuses_what_peft_cannot_express(tmp_path, tiny_models, run_cli):
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"}, training={"max_steps": 1})
    assert run_cli("train", recipe)[0] == 0
    code, out, err = run_cli("export", tmp_path / "run" / "final", tmp_path / "adapter")
    assert code == 2 and "task.prompt_position: start" in err and "Traceback" not in out + err
    assert not (tmp_path / "adapter").exists()
    assert run_cli("train", recipe, "task.pooling=mean", "output.overwrite=true")[0] == 0
    code, out, err = run_cli("export", tmp_path / "run" / "final", tmp_path / "adapter")
    assert code == 2 and "task.pooling: model" in err


PEFT_CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    "prefix_tuning_projection": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                                                prefix_projection=True, encoder_hidden_size=8),
    "p_tuning_mlp": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=8),
    "p_tuning_lstm": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=8,
                                                      encoder_reparameterization_type="LSTM"),
}


@pytest.mark.parametrize("variant", PEFT_CONFIGS)
def test_peft_adapter_evaluates_and_predicts_here(tmp_path, tiny_models, run_cli, variant):
    from transformers import AutoModelForSequenceClassification

    from softprompt_cli.recipe import load_recipe

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    model = peft.get_peft_model(base, PEFT_CONFIGS[variant]())
    with torch.no_grad():  # a head that is not at its initialization, so that a mix-up would show
        model.base_model.classifier.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_path / "adapter")
    recipe = write_recipe(tmp_path, str(tiny_models["bert"]), {"name": "prompt_tuning"})

    expected = peft_logits(tiny_models["bert"], tmp_path / "adapter", *PAIRS)
    ours = our_logits(tmp_path / "adapter", *PAIRS, data_recipe=load_recipe(recipe))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

    code, out, err = run_cli("eval", tmp_path / "adapter", "--recipe", recipe)
    assert code == 0, out + err
    code, out, err = run_cli("predict", tmp_path / "adapter", "--text", PAIRS[0][0], "--text-pair", PAIRS[1][0])
    assert code == 0 and '"label": "LABEL_' in out, out + err
    code, out, err = run_cli("eval", tmp_path / "adapter")
    assert code == 2 and "--recipe" in err and "Traceback" not in out + err
