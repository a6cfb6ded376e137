"""The last encoder layer computed for [CLS] alone: the same logits and gradients as the full layer."""

from __future__ import annotations

import pytest
import torch
from conftest import save_random_model

from softprompt_cli.model.first_token import first_token_forward, last_bert_layer
from softprompt_cli.model.loading import enable_checkpointing, load_base_model, load_tokenizer, prepare_frozen
from softprompt_cli.model.soft_prompt import SoftPromptModel
from tests.test_methods import LABELS, method_options


def build(path, variant: str, pooling: str = "model", dtype: str = "float64") -> tuple[SoftPromptModel, object]:
    tokenizer = load_tokenizer(str(path))
    torch.manual_seed(0)  # the new head's initial weights
    base = load_base_model(str(path), revision=None, dtype=dtype, trust_remote_code=False, pooling=pooling,
                           label_names=LABELS)
    for module in base.modules():  # the full and the shortcut layer draw different dropout masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    prepare_frozen(base, tokenizer, pooling=pooling)
    return SoftPromptModel(base, method_options(variant), tokenizer, pooling, len(LABELS), max_length=64), tokenizer


def full_last_layer(model: SoftPromptModel) -> None:
    del model.base.base_model.encoder.layer[-1].forward  # back to the class's forward


def loss_and_gradients(model: SoftPromptModel, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    # pairs of different lengths: right padding, token types, and a [B, 1, L, L] mask to slice
    rows = dict(tokenizer(["a short one", "a sentence with quite a few more words in it"], ["yes", "no it is not"],
                          padding=True, return_tensors="pt"))
    output = model(**rows, labels=torch.tensor([0, 2]))
    output["loss"].backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output["loss"].detach(), output["logits"].detach(), gradients


@pytest.fixture(scope="module")
def bert_family(tiny_models, tmp_path_factory) -> dict[str, object]:
    """Tiny random RoBERTa and ELECTRA (transformers' copies of BERT's layer, with their own heads)."""
    from transformers import AutoModel, AutoTokenizer, ElectraConfig, RobertaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bert"])
    shape = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37, max_position_embeddings=160)
    folders = {"bert": tiny_models["bert"]}
    configs = (("roberta", RobertaConfig(**shape, pad_token_id=0)),
               ("electra", ElectraConfig(**shape, embedding_size=16)))
    for kind, config in configs:
        folders[kind] = save_random_model(tmp_path_factory.mktemp(kind), AutoModel, config, tokenizer)
    return folders


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning"])
@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_first_token_shortcut_gives_the_full_layers_loss_logits_and_gradients(bert_family, kind, variant,
                                                                              checkpointing):
    results = []
    for shortcut in (True, False):
        model, tokenizer = build(bert_family[kind], variant)
        assert last_bert_layer(model.base) is not None
        if not shortcut:
            full_last_layer(model)
        if checkpointing:
            enable_checkpointing(model.base)
        model.train()
        results.append(loss_and_gradients(model, tokenizer))
    (loss, logits, gradients), (full_loss, full_logits, full_gradients) = results
    torch.testing.assert_close(loss, full_loss)
    torch.testing.assert_close(logits, full_logits)
    assert gradients.keys() == full_gradients.keys() and any(n.startswith("prompt.") for n in gradients)
    for name in gradients:
        torch.testing.assert_close(gradients[name], full_gradients[name])


def test_the_shortcut_computes_only_the_first_token(tiny_models):
    model, tokenizer = build(tiny_models["bert"], "prompt_tuning")
    shapes = []
    model.base.base_model.encoder.register_forward_hook(lambda m, args, out: shapes.append(out.last_hidden_state.shape))
    model.eval()
    model.scores(**dict(tokenizer(["one two three", "four"], padding=True, return_tensors="pt")))
    assert shapes == [torch.Size([2, 1, 32])]


def test_the_shortcut_keeps_attention_dropout_in_training(tiny_models):
    model, tokenizer = build(tiny_models["bert"], "prompt_tuning", dtype="float32")
    model.base.base_model.encoder.layer[-1].attention.self.dropout.p = 0.5
    model.train()
    rows = dict(tokenizer(["one two three four five"], return_tensors="pt"))
    draws = {float(model(**rows)["logits"][0, 0].detach()) for _ in range(4)}
    assert len(draws) > 1


@pytest.mark.parametrize("kind, pooling", [("bert", "mean"), ("gpt2", "model"), ("llama", "model")])
def test_no_shortcut_where_the_head_reads_more_than_the_first_token(tiny_models, kind, pooling):
    model, _ = build(tiny_models[kind], "prompt_tuning", pooling, dtype="float32")
    patched = [vars(module)["forward"].__func__ for module in model.base.modules() if "forward" in vars(module)]
    assert first_token_forward not in patched
