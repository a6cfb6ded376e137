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


PEFT_REFUSES_PREFIX = "Model does not support past key values"


def peft_logits(base_path, adapter, texts, pairs):
    """PEFT's logits for the adapter. Where this PEFT refuses prefix tuning on the model (it looks for
    `past_key_values`, which transformers 5 calls `cache`), the refusal is checked to be that one, and the
    logits come from the model with `expose_past_key_values`, the documented way around it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from softprompt_cli.peft_compat import expose_past_key_values, names_past_key_values

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    inputs = tokenizer(texts, pairs, padding=True, return_tensors="pt")
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        if model.peft_config["default"].peft_type != "PREFIX_TUNING" or names_past_key_values(base):
            return model(**inputs).logits
        try:
            return model(**inputs).logits  # a PEFT that no longer needs the name
        except ValueError as err:
            assert PEFT_REFUSES_PREFIX in str(err)
        base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
        model = peft.PeftModel.from_pretrained(expose_past_key_values(base), adapter).eval()
        return model(**inputs).logits


def our_logits(folder, texts, pairs, data_recipe=None):
    from softprompt_cli.assemble import load_trained

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
    # Where PEFT would refuse the adapter (prefix tuning on a forward without past_key_values), export says how
    # to load it; the logits below are computed that way.
    assert ("expose_past_key_values" in err) == variant.startswith("prefix_tuning"), err
    # PEFT's decoder classifiers read the last position: compare on rows without padding there.
    rows = (PAIRS[0][:1], PAIRS[1][:1]) if kind == "gpt2" else PAIRS
    expected = peft_logits(tiny_models[kind], tmp_path / "adapter", *rows)
    torch.testing.assert_close(our_logits(tmp_path / "run" / "final", *rows), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix_tuning", "p_tuning_mlp"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_exported_causal_lm_checkpoint_gives_the_same_next_token_logits_in_peft(tmp_path, tiny_models, run_cli,
                                                                                kind, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt_cli.assemble import load_trained

    recipe = write_recipe(tmp_path, str(tiny_models[kind]), EXPORTABLE[variant], training={"max_steps": 2},
                          data={"glue_task": "sst2"}, task={"type": "causal_lm", "template": "{sentence} It was",
                                                            "label_words": {"0": " bad", "1": " good"}})
    assert run_cli("train", recipe)[0] == 0
    code, out, err = run_cli("export", tmp_path / "run" / "final", tmp_path / "adapter")
    assert code == 0, out + err
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    row = tokenizer(["a fine film It was"], return_tensors="pt")
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models[kind]),
                                           tmp_path / "adapter").eval()
    _, ours, _, _ = load_trained(tmp_path / "run" / "final")
    with torch.no_grad():
        expected = model(**row).logits[:, -1]  # PEFT's prompt-tuning logits also cover the virtual tokens
        encoded = ours.encode(row["input_ids"], row["attention_mask"], None, ours.prompt_for(None, 1))
        actual = ours.lm_head(encoded.states[:, -1])
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

    from softprompt_cli.config.load import load_recipe

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
    assert code == 0 and '"pred_label": "LABEL_' in out, out + err
    code, out, err = run_cli("eval", tmp_path / "adapter")
    assert code == 2 and "--recipe" in err and "Traceback" not in out + err


def test_expose_past_key_values_hands_the_prefix_on_as_the_cache():
    from softprompt_cli.peft_compat import expose_past_key_values, names_past_key_values

    class Model:
        def forward(self, input_ids=None, cache=None, **kwargs):
            return {"input_ids": input_ids, "cache": cache, **kwargs}

    model = Model()
    assert not names_past_key_values(model)
    assert expose_past_key_values(model) is model and names_past_key_values(model)
    assert model.forward(1, past_key_values="prefix", flag=True) == {"input_ids": 1, "cache": "prefix", "flag": True}
    assert model.forward(input_ids=2) == {"input_ids": 2, "cache": None}
    wrapped = model.forward
    assert expose_past_key_values(model).forward is wrapped  # applied once
    assert not names_past_key_values(Model())  # the class is untouched


def test_export_notes_that_peft_drops_the_token_types_of_pairs():
    from types import SimpleNamespace

    from softprompt_cli.commands.export import token_type_note
    from softprompt_cli.config.load import parse_recipe

    def recipe(task: str):
        return parse_recipe({"model": {"name_or_path": "m"}, "data": {"glue_task": task, "dir": "glue"},
                             "method": {"name": "prompt_tuning"}})

    segments = SimpleNamespace(config=SimpleNamespace(type_vocab_size=2))
    assert "token_type_ids" in token_type_note(recipe("mrpc"), segments)
    assert token_type_note(recipe("sst2"), segments) is None  # single texts: equal in PEFT
    assert token_type_note(recipe("mrpc"), SimpleNamespace(config=SimpleNamespace(type_vocab_size=1))) is None
