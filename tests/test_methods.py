"""Each method's forward on tiny random encoder and decoder models: shapes, masks, gradients, freezing."""

from __future__ import annotations

import pytest
import torch

from softprompt_cli.methods.base import registry
from softprompt_cli.model.loading import enable_checkpointing, load_base_model, load_tokenizer, prepare_frozen
from softprompt_cli.model.soft_prompt import SoftPromptModel

KINDS = ("bert", "gpt2", "llama")
METHODS = {
    "prompt_tuning": {},
    "prompt_tuning_text": {"init": "text", "init_text": "are these two sentences paraphrases"},
    "p_tuning_mlp": {"encoder": "mlp"},
    "p_tuning_lstm": {"encoder": "lstm"},
    "prefix_tuning": {},
    "prefix_tuning_projection": {"projection": True, "encoder_hidden_size": 16},
}
LABELS = ["a", "b", "c"]


def method_options(variant: str):
    name = next(n for n in registry() if variant.startswith(n))
    return registry()[name](name=name, num_virtual_tokens=4, **METHODS[variant])


def build(path, variant: str, pooling: str = "model") -> tuple[SoftPromptModel, object]:
    options = method_options(variant)
    tokenizer = load_tokenizer(str(path))
    base = load_base_model(str(path), revision=None, dtype="float32", trust_remote_code=False, pooling=pooling,
                           label_names=LABELS)
    prepare_frozen(base, tokenizer, pooling=pooling)
    torch.manual_seed(0)
    return SoftPromptModel(base, options, tokenizer, pooling, len(LABELS), max_length=64), tokenizer


def batch(tokenizer, texts, pairs=None, padding_side=None):
    if padding_side:
        tokenizer.padding_side = padding_side
    return dict(tokenizer(texts, pairs, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("pooling", ["model", "mean"])
@pytest.mark.parametrize("variant", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_only_prompt_and_head_receive_gradients(tiny_models, kind, variant, pooling):
    model, tokenizer = build(tiny_models[kind], variant, pooling)
    inputs = batch(tokenizer, ["the cat sat on the mat", "a dog"], ["yes", "no it did not"])
    out = model(**inputs, labels=torch.tensor([0, 2]))
    assert out["logits"].shape == (2, len(LABELS))
    out["loss"].backward()
    trainable = set(model.trainable_state())
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert any(n.startswith("prompt.") for n in trainable)
    assert all(not n.startswith("base.") or n.split(".")[1] in ("classifier", "score") for n in trainable)
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if n.startswith("prompt."))


@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning_projection"])
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_weights_unchanged_after_training(tiny_models, kind, variant):
    model, tokenizer = build(tiny_models[kind], variant)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    prompt_before = {n: t.clone() for n, t in model.trainable_state().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch(tokenizer, ["one two three", "four"])
    for _ in range(3):
        model(**inputs, labels=torch.tensor([1, 0]))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(t, prompt_before[n]) for n, t in model.trainable_state().items())


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_lstm", "prefix_tuning"])
@pytest.mark.parametrize("pooling", ["model", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_logits(tiny_models, kind, variant, pooling, padding_side):
    if kind == "bert" and padding_side == "left":
        pytest.skip("encoders are always padded on the right (see test_encoders_pad_right)")
    model, tokenizer = build(tiny_models[kind], variant, pooling)
    model.eval()
    short, long = "a short one", "a much longer sentence that forces padding onto the short one"
    alone = model(**batch(tokenizer, [short], padding_side=padding_side))["logits"]
    together = model(**batch(tokenizer, [short, long], padding_side=padding_side))["logits"]
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-4)


def test_encoders_pad_right(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["bert"]))
    tokenizer.padding_side = "left"
    base = load_base_model(str(tiny_models["bert"]), revision=None, dtype="float32", trust_remote_code=False,
                           pooling="model", label_names=LABELS)
    prepare_frozen(base, tokenizer)  # once per base model and tokenizer, before any soft prompt is built on them
    SoftPromptModel(base, method_options("prompt_tuning"), tokenizer, "model", len(LABELS), max_length=64)
    assert tokenizer.padding_side == "right"


def test_virtual_tokens_go_after_cls_in_encoders_and_first_in_decoders(tiny_models):
    assert build(tiny_models["bert"], "prompt_tuning")[0].insert_at == 1
    assert build(tiny_models["gpt2"], "prompt_tuning")[0].insert_at == 0
    assert build(tiny_models["llama"], "prompt_tuning")[0].insert_at == 0


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_through_attention_equals_dynamic_cache(tiny_models, kind):
    from transformers import DynamicCache

    model, tokenizer = build(tiny_models[kind], "prefix_tuning")
    model.eval()
    inputs = batch(tokenizer, ["first sentence here", "second"], padding_side="right")
    mask = inputs["attention_mask"]
    n = model.num_virtual_tokens
    prefix = model.prompt()  # [layers, 2, 1, kv_heads, n, head_dim]
    body = model.base.base_model
    if model.is_decoder:
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + n
    else:
        positions = torch.arange(mask.shape[1])[None].expand(2, -1) + n
    ours = body(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions,
                softprompt_prefix=prefix).last_hidden_state
    cache = DynamicCache(config=body.config)
    for layer, (key, value) in enumerate(prefix):
        cache.update(key.expand(2, -1, -1, -1), value.expand(2, -1, -1, -1), layer)
    reference = body(input_ids=inputs["input_ids"],
                     attention_mask=torch.cat([torch.ones(2, n, dtype=mask.dtype), mask], 1),
                     position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=1e-4)


def test_grouped_query_prefix_has_kv_heads(tiny_models):
    model, _ = build(tiny_models["llama"], "prefix_tuning")
    layers, two, one, kv_heads, n, head_dim = model.prompt().shape
    assert (layers, two, kv_heads, n, head_dim) == (2, 2, 2, 4, 8)


@pytest.mark.parametrize("kind", ["bert", "gemma3"])
def test_prompt_tuning_text_init_uses_token_embeddings(tiny_models, kind):
    """As the model's first layer sees them: Gemma 3 scales its embedding table by sqrt(hidden) in the module."""
    model, tokenizer = build(tiny_models[kind], "prompt_tuning_text")
    ids = tokenizer(METHODS["prompt_tuning_text"]["init_text"], add_special_tokens=False)["input_ids"][:4]
    embedding = model.base.get_input_embeddings()
    scale = embedding.embed_scale if kind == "gemma3" else 1.0
    assert kind == "bert" or scale > 5
    torch.testing.assert_close(model.prompt(), embedding.weight[ids] * scale)


def test_vocabulary_samples_equal_peft_sample_vocab(tiny_models):
    """PEFT's SAMPLE_VOCAB draws ids the same way and embeds them through the module (scaled, in Gemma 3)."""
    from peft import PromptTuningConfig, PromptTuningInit
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    from softprompt_cli.methods._layers import Vocabulary

    embedding = build(tiny_models["gemma3"], "prompt_tuning")[0].base.get_input_embeddings()
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=32,
                                num_transformer_submodules=1, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    torch.manual_seed(7)
    theirs = PromptEmbedding(config, embedding).embedding.weight
    torch.manual_seed(7)
    torch.nn.Embedding(4, 32)  # PEFT draws its table's first values before the ids
    torch.testing.assert_close(Vocabulary(embedding).sample(4), theirs)


def test_random_init_has_the_spread_of_the_embeddings_the_model_sees(tiny_models):
    from softprompt_cli.methods._layers import Vocabulary

    embedding = build(tiny_models["gemma3"], "prompt_tuning")[0].base.get_input_embeddings()
    seen = embedding(torch.arange(embedding.num_embeddings)).detach()
    assert Vocabulary(embedding)._std() == pytest.approx(seen.std().item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("kind", KINDS)
def test_pair_mean_pools_each_text_alone(tiny_models, kind, variant):
    """pair_mean takes 2B rows (first texts, then second texts) and gives B predictions."""
    model, tokenizer = build(tiny_models[kind], variant, "pair_mean")
    model.eval()
    firsts, seconds = ["a first text", "another one here"], ["its pair", "the other pair text"]
    logits = model(**batch(tokenizer, firsts + seconds, padding_side="right"))["logits"]
    assert logits.shape == (2, len(LABELS))
    alone = model(**batch(tokenizer, [firsts[1], seconds[1]]))["logits"]
    torch.testing.assert_close(logits[1], alone[0], atol=1e-5, rtol=1e-4)
    model.train()
    model(**batch(tokenizer, firsts + seconds), labels=torch.tensor([0, 1]))["loss"].backward()
    assert model.head.weight.grad.shape == (len(LABELS), 4 * model.base.config.hidden_size)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("prompt."))


@pytest.mark.parametrize("variant", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning", "prefix_tuning_projection"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_models, kind, variant,
                                                                  computed_once_at_any_size):
    results = []
    for checkpointing in (False, True):
        model, tokenizer = build(tiny_models[kind], variant, "mean")
        if checkpointing:
            enable_checkpointing(model.base)
        model.train()
        model.share_leading_tokens = False  # both rows start with [CLS]: one more pass (tests/test_leading_tokens.py)
        calls = []
        attention = next(m for m in model.base.modules() if hasattr(m, "layer_idx"))
        attention.register_forward_hook(lambda *args: calls.append(1))
        torch.manual_seed(5)  # the same dropout masks in both runs (checkpointing replays the RNG)
        loss = model(**batch(tokenizer, ["one sentence here", "two"], padding_side="right"),
                     labels=torch.tensor([0, 2]))["loss"]
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_plain, grads_plain), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss_plain)
    assert grads_checkpointed.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_checkpointed[name], grads_plain[name], atol=1e-6, rtol=1e-5)



def test_the_registry_refuses_a_second_method_under_a_taken_name():
    from typing import Literal

    from softprompt_cli.methods.base import MethodOptions, register

    class Impostor(MethodOptions):
        name: Literal["prompt_tuning"] = "prompt_tuning"

    before = registry()
    with pytest.raises(ValueError, match="registered twice"):
        register(Impostor)
    assert registry() == before
