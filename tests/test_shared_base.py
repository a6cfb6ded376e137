"""Several soft prompts on ONE frozen base model and ONE tokenizer (predict, a server).

The rule under test: `loading.prepare_frozen` makes every one-time change to the base model and the tokenizer;
building a SoftPromptModel changes nothing shared. So a soft prompt built on a shared base must behave exactly
as the same soft prompt built alone, and building any number of them must leave the shared objects as they were.
"""

from __future__ import annotations

import pytest
import torch

from softprompt_cli.methods.base import registry
from softprompt_cli.model.loading import load_base_model, load_tokenizer, prepare_frozen
from softprompt_cli.model.soft_prompt import SoftPromptModel

LABELS = ["a", "b", "c"]
TEXTS = ["a short one", "a much longer sentence that forces padding onto the others", "two words"]
MAX_LENGTH = 64

# (method name, its options, pooling): differently configured soft prompts for one shared base model
SHARED_CONFIGS = [
    ("prompt_tuning", {"num_virtual_tokens": 4}, "mean"),
    ("prefix_tuning", {"num_virtual_tokens": 6}, "mean"),
    ("p_tuning", {"num_virtual_tokens": 5, "encoder": "mlp", "encoder_hidden_size": 16}, "pair_mean"),
]


def options(name: str, values: dict):
    return registry()[name](name=name, **values)


def frozen(path, pooling: str) -> tuple[torch.nn.Module, object]:
    """A freshly loaded base model and tokenizer, prepared once for soft prompts."""
    tokenizer = load_tokenizer(str(path))
    base = load_base_model(str(path), revision=None, dtype="float32", trust_remote_code=False, pooling=pooling,
                           label_names=LABELS)
    prepare_frozen(base, tokenizer, pooling=pooling)
    return base, tokenizer


def build_on(base, tokenizer, name: str, values: dict, pooling: str, seed: int) -> SoftPromptModel:
    torch.manual_seed(seed)  # known prompt and head weights, the same for the shared model and its twin
    return SoftPromptModel(base, options(name, values), tokenizer, pooling, len(LABELS), max_length=MAX_LENGTH)


def logits_of(model: SoftPromptModel, tokenizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs and logits of a padded batch (pair_mean: one pair of texts of different lengths)."""
    texts = TEXTS[:2] if model.pooling == "pair_mean" else TEXTS
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return inputs, model(**inputs)["logits"]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_soft_prompts_sharing_a_base_give_what_they_give_alone(tiny_models, kind):
    """Three differently configured soft prompts (prompt tuning, prefix tuning, P-tuning; 4/6/5 virtual tokens;
    mean and pair_mean pooling) built one after another on one shared base and tokenizer give, on a padded
    batch, the logits of the same configuration built alone on a fresh base with the same seed. Logits are
    taken only after all of them were built, so any change one build made to the shared objects (padding side,
    pad token, config, hooks, patched forwards, frozen weights) would show in the others' logits or inputs."""
    base, tokenizer = frozen(tiny_models[kind], "mean")
    shared = [build_on(base, tokenizer, name, values, pooling, seed=10 + i)
              for i, (name, values, pooling) in enumerate(SHARED_CONFIGS)]
    for model in shared:
        model.eval()
    for i, ((name, values, pooling), model) in enumerate(zip(SHARED_CONFIGS, shared)):
        alone_base, alone_tokenizer = frozen(tiny_models[kind], "mean")
        alone = build_on(alone_base, alone_tokenizer, name, values, pooling, seed=10 + i).eval()
        shared_inputs, shared_logits = logits_of(model, tokenizer)
        alone_inputs, alone_logits = logits_of(alone, alone_tokenizer)
        assert shared_inputs.keys() == alone_inputs.keys() and not shared_inputs["attention_mask"].all()
        for key in shared_inputs:  # the shared tokenizer still tokenizes and pads as a fresh one does
            assert torch.equal(shared_inputs[key], alone_inputs[key]), (name, key)
        expected_rows = 1 if pooling == "pair_mean" else len(TEXTS)
        assert shared_logits.shape == (expected_rows, len(LABELS))
        torch.testing.assert_close(shared_logits, alone_logits, atol=1e-6, rtol=0)
        prompt_state, alone_prompt_state = model.prompt.state_dict(), alone.prompt.state_dict()
        assert prompt_state.keys() == alone_prompt_state.keys() and prompt_state
        for key in prompt_state:
            assert torch.equal(prompt_state[key], alone_prompt_state[key]), (name, key)
        trained, alone_trained = model.trainable_state(), alone.trainable_state()
        assert trained.keys() == alone_trained.keys()
        assert all(torch.equal(trained[k], alone_trained[k]) for k in trained)
    # the models differ from one another: equality above is not the trivial equality of identical models
    outputs = [logits_of(model, tokenizer)[1] for model in shared[:2]]
    assert not torch.allclose(outputs[0], outputs[1])


def snapshot(base: torch.nn.Module, tokenizer) -> dict[str, object]:
    """Everything a soft prompt build could change on the shared base model and tokenizer."""
    modules = dict(base.named_modules())
    return {
        "tokenizer": (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token, tokenizer.eos_token,
                      tokenizer.pad_token_id, len(tokenizer), tuple(tokenizer.all_special_tokens)),
        "config": base.config.to_dict(),
        "module names": list(modules),
        "training": {name: m.training for name, m in modules.items()},
        "requires_grad": {name: p.requires_grad for name, p in base.named_parameters()},
        "parameters": {name: p.detach().clone() for name, p in base.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in base.named_buffers()},
        "hooks": {name: (list(m._forward_pre_hooks), list(m._forward_hooks), list(m._backward_hooks),
                         list(getattr(m, "_forward_hooks_with_kwargs", {})))
                  for name, m in modules.items()},
        "forwards": {name: m.__dict__.get("forward") for name, m in modules.items()},
        "attributes": {name: sorted(vars(m)) for name, m in modules.items()},
    }


def assert_same_snapshot(after: dict[str, object], before: dict[str, object]) -> None:
    assert after.keys() == before.keys()
    for key in ("tokenizer", "config", "module names", "training", "requires_grad", "hooks", "attributes"):
        assert after[key] == before[key], key
    for name, forward in before["forwards"].items():
        assert after["forwards"][name] is forward, f"forward of {name!r} replaced"
    for key in ("parameters", "buffers"):
        assert after[key].keys() == before[key].keys(), key
        for name, tensor in before[key].items():
            assert torch.equal(after[key][name], tensor), f"{key}: {name}"


# (prepared pooling, builds): every build is (method name, options, pooling); a base prepared with
# pooling="model" is a sequence-classification model whose own head the pooling="model" builds read.
SNAPSHOT_CASES = {
    "model": [
        ("prompt_tuning", {"num_virtual_tokens": 4}, "model"),
        ("prefix_tuning", {"num_virtual_tokens": 3, "init": "text", "init_text": "is this a paraphrase of that"},
         "mean"),
        ("p_tuning", {"num_virtual_tokens": 5, "encoder": "lstm", "encoder_hidden_size": 8}, "model"),
    ],
    "mean": [
        ("prompt_tuning", {"num_virtual_tokens": 4, "init": "text", "init_text": "classify this sentence"}, "mean"),
        ("prefix_tuning", {"num_virtual_tokens": 6, "projection": True, "encoder_hidden_size": 16}, "pair_mean"),
        ("p_tuning", {"num_virtual_tokens": 5, "encoder": "mlp", "encoder_hidden_size": 16}, "mean"),
    ],
}


@pytest.mark.parametrize(("kind", "prepared"), [("bert", "model"), ("gpt2", "model"), ("bert", "mean"),
                                                 ("llama", "mean")])
def test_building_a_soft_prompt_changes_nothing_shared(tiny_models, kind, prepared):
    """After prepare_frozen, building three soft prompts of different methods and poolings (including ones that
    run the base model to initialise from text, and pooling="model" ones that use the base's own head, on a
    base prepared for it) leaves the tokenizer (padding side, special tokens), the config, every parameter's
    value and requires_grad flag, every buffer, module training flags, every module's hooks, patched forwards
    and attributes exactly as prepare_frozen left them: other soft prompts share all of these."""
    base, tokenizer = frozen(tiny_models[kind], prepared)
    before = snapshot(base, tokenizer)
    if kind == "bert" and prepared == "model":  # prepare_frozen's own changes are there to be kept
        assert any(before["hooks"][name][0] for name in before["hooks"])
        assert any(forward is not None for forward in before["forwards"].values())
    built = [build_on(base, tokenizer, name, values, pooling, seed=i)
             for i, (name, values, pooling) in enumerate(SNAPSHOT_CASES[prepared])]
    assert all(model.base is base for model in built)
    assert_same_snapshot(snapshot(base, tokenizer), before)
