"""`softprompt serve`: a real uvicorn server on 127.0.0.1 with tiny models, driven by httpx and the openai client.
Oracles: the same requests answered one at a time (and by the model directly), and `softprompt predict`."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import SST2_LM_TASK as SST2_TASK
from serving_helpers import RunningServer, slow_decoding

from softprompt_cli.serving.app import Settings, create_app
from softprompt_cli.serving.engine import Limits
from softprompt_cli.serving.registry import Registry

CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
PROMPTS = ["the movie was", "a dull , plodding", "one of the best films", "i did not", "what a", "x"]


def _server(references: list[str], **settings) -> RunningServer:
    limits = settings.pop("limits", Limits())
    app = create_app(Registry(references), Settings(limits=limits, chat_template=CHAT_TEMPLATE, **settings))
    return RunningServer(app, settings.get("api_key"))


async def _concurrently(url: str, requests: list[tuple[str, dict]], headers: dict | None = None) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        answers = await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
    return [(a.status_code, a.json()) for a in answers]


def test_concurrent_completions_equal_the_same_requests_one_at_a_time(lm_checkpoints, tiny_models):
    references = [f"{name}={path}" for name, path in lm_checkpoints.items()]
    with _server(references) as server:
        base = server.client().get("/v1/models").json()["data"][0]["id"]
        names = [*lm_checkpoints, base]
        requests = [("/v1/completions", {"model": names[i % len(names)], "prompt": PROMPTS[i % len(PROMPTS)],
                                         "max_tokens": 3 + i % 5, "temperature": 0}) for i in range(16)]
        with server.client() as client:
            alone = [client.post(path, json=body) for path, body in requests]
        together = asyncio.run(_concurrently(server.url, requests))
    assert all(a.status_code == 200 for a in alone), [a.text for a in alone]
    assert [t[0] for t in together] == [200] * len(requests)
    texts = [a.json()["choices"][0]["text"] for a in alone]
    assert [t[1]["choices"][0]["text"] for t in together] == texts
    assert any(texts)


@pytest.fixture(scope="module")
def lm_server(lm_checkpoints):
    with _server([f"{name}={path}" for name, path in lm_checkpoints.items()],
                 limits=Limits(max_batch_size=8, max_queue=64), max_tokens_limit=40) as server:
        yield server


@pytest.mark.parametrize("kind", ["input", "prefix"])
@pytest.mark.parametrize("decoder", ["llama", "gpt2"])
def test_rows_joining_a_running_batch_decode_as_they_would_alone(tiny_models, decoder, kind):
    """The engine's batch operations: rows prefilled apart, merged into a batch already decoding (caches of other
    lengths), and dropped when done, give each row the tokens it gets alone."""
    import torch

    from softprompt_cli.assemble import build_model
    from softprompt_cli.config.load import parse_recipe
    from softprompt_cli.model import lm

    recipe = parse_recipe({"model": {"name_or_path": str(tiny_models[decoder])},
                           "data": {"glue_task": "sst2"}, "task": SST2_TASK,
                           "method": {"name": "prefix_tuning" if kind == "prefix" else "prompt_tuning",
                                      "num_virtual_tokens": 3}})
    model, tokenizer = build_model(recipe, ["negative", "positive"])
    model.eval()
    with torch.no_grad():
        prompt = model.prompt_for(None, 1)
    texts = ["the movie was", "a dull , plodding mess of a", "one"]

    def alone(text: str, steps: int) -> list[int]:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        return lm.generate(model, ids, torch.ones_like(ids), steps, -1, prompt).tolist()[0]

    def prefilled(index: int):
        ids = torch.tensor([tokenizer(texts[index])["input_ids"]])
        return lm.prefill(model, ids, torch.ones_like(ids), prompt)

    state, logits = prefilled(0)
    rows, produced = [0], {0: []}
    for step in range(6):
        if step in (2, 3):  # a longer, then a shorter row join mid-generation
            joining, joining_logits = prefilled(step - 1)
            lm.merge_decoding(state, joining)
            logits = torch.cat([logits, joining_logits])
            rows.append(step - 1)
            produced[step - 1] = []
        tokens = logits.argmax(-1)
        for row, token in zip(rows, tokens.tolist()):
            produced[row].append(token)
        if step == 4:  # the first row is done: it leaves the batch
            keep = torch.tensor([1, 2])
            lm.keep_rows(state, keep)
            rows, tokens = [rows[1], rows[2]], tokens[keep]
        logits = lm.decode_step(model, state, tokens)
    for row, tokens in produced.items():
        assert tokens == alone(texts[row], len(tokens)), row


def _complete(client, model: str, prompt: str, **options) -> dict:
    answer = client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0, **options})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_generation_joins_while_a_long_one_decodes(lm_server, monkeypatch):
    """A short request sent while a long one decodes is answered before the long one ends, with what it gets
    alone (each decode step is slowed down, so that the long one surely still runs)."""
    slow_decoding(monkeypatch, 0.02)
    with lm_server.client() as client:
        short_alone = _complete(client, "prefix", "i did not", max_tokens=2)["choices"][0]["text"]

    async def race() -> list[str]:
        async with httpx.AsyncClient(base_url=lm_server.url, timeout=60) as client:
            order = []

            async def send(body: dict, label: str):
                answer = await client.post("/v1/completions", json={"temperature": 0, **body})
                order.append((label, answer.json()["choices"][0]["finish_reason"]))
                return answer.json()["choices"][0]["text"]

            long = asyncio.create_task(send({"model": "pt", "prompt": "what a", "max_tokens": 40,
                                             "stop": "never-appears"}, "long"))
            await asyncio.sleep(0.3)
            short = await send({"model": "prefix", "prompt": "i did not", "max_tokens": 2}, "short")
            await long
            return [short, *order]

    short, *order = asyncio.run(race())
    assert short == short_alone
    assert order == [("short", "length"), ("long", "length")]


def test_openai_client_completions_chat_and_streaming(lm_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=lm_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} >= {"pt", "prefix", "ptuning"}
    whole = client.completions.create(model="pt", prompt="the movie was", max_tokens=6, temperature=0)
    streamed = client.completions.create(model="pt", prompt="the movie was", max_tokens=6, temperature=0,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens >= 1

    messages = [{"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model="prefix", messages=messages, max_tokens=5, temperature=0)
    chat_stream = client.chat.completions.create(model="prefix", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    parts = list(chat_stream)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="pt, prefix"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_stop_strings_max_tokens_and_sampling_seed(lm_server):
    with lm_server.client() as client:
        free = _complete(client, "ptuning", "what a", max_tokens=12)["choices"][0]
        assert free["finish_reason"] == "length"
        words = free["text"].split()
        assert len(words) >= 3, free
        stopped = _complete(client, "ptuning", "what a", max_tokens=12, stop=[words[2]])["choices"][0]
        assert stopped["finish_reason"] == "stop"
        assert stopped["text"] == free["text"][:free["text"].index(words[2])]
        sampled = [_complete(client, "pt", "what a", max_tokens=8, temperature=1.3, seed=7)["choices"][0]["text"]
                   for _ in range(2)]
        assert sampled[0] == sampled[1]


def test_classify_answers_what_predict_gives(classifiers, lm_checkpoints, run_cli):
    pairs = [["The cat sat on the mat.", "A cat was sitting on the mat."], ["He left.", "Stocks rose sharply today."],
             ["It rained.", "It was raining."]]
    references = [f"{name}={path}" for name, path in classifiers.items()]
    requests = [("/v1/classify", {"model": name, "input": pairs[i % 3:] or pairs})
                for i, name in enumerate(list(classifiers) * 3)]  # three kinds of prompt: batched apart
    with _server(references) as server:
        answers = asyncio.run(_concurrently(server.url, requests))
    for (_, body), (status, answer) in zip(requests, answers):
        assert status == 200, answer
        first = body["input"][0]
        code, out, err = run_cli("predict", classifiers[body["model"]], "--text", first[0], "--text-pair", first[1])
        assert code == 0, err
        expected = json.loads(out.splitlines()[0])
        got = answer["data"][0]
        assert got["label"] == expected["pred_label"]
        assert got["probabilities"] == pytest.approx(expected["pred_probabilities"], abs=2e-6)
    with _server([f"pt={lm_checkpoints['pt']}"]) as server, server.client() as client:
        answer = client.post("/v1/classify", json={"model": "pt", "input": ["a fine film", "dull"]})
        code, out, _ = run_cli("predict", lm_checkpoints["pt"], "--text", "a fine film", "--text", "dull")
    assert answer.status_code == 200, answer.text
    expected = [json.loads(line)["pred_probabilities"] for line in out.splitlines()]
    assert [d["probabilities"] for d in answer.json()["data"]] == [pytest.approx(e, abs=2e-6) for e in expected]


def test_a_peft_adapter_is_served_unchanged(classifiers, tmp_path, run_cli):
    adapter = tmp_path / "adapter"
    code, _, err = run_cli("export", classifiers["mrpc_start"], adapter)
    assert code == 0, err
    body = {"input": [["The cat sat.", "A cat was sitting."], ["He left.", "Stocks rose."]]}
    with _server([f"ours={classifiers['mrpc_start']}", f"peft={adapter}"]) as server, server.client() as client:
        ours = client.post("/v1/classify", json={"model": "ours", **body})
        peft = client.post("/v1/classify", json={"model": "peft", **body})
    assert ours.status_code == peft.status_code == 200, peft.text
    for a, b in zip(ours.json()["data"], peft.json()["data"]):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_classify_counts_every_token_of_a_long_input(classifiers):
    """--max-input-tokens counts a classifier's input before the recipe's truncation (max_length 128 here), whatever
    truncation earlier requests left set on the shared tokenizer; inputs under it are answered as before."""
    long_pair = ["word " * 200, "word " * 200]
    with _server([f"pt={classifiers['mrpc_pt']}"], max_input_tokens=300) as server, server.client() as client:
        short = client.post("/v1/classify", json={"model": "pt", "input": [["The cat sat.", "A cat sat."]]})
        refused = client.post("/v1/classify", json={"model": "pt", "input": [long_pair]})
        kept = client.post("/v1/classify", json={"model": "pt", "input": [["word " * 140, "word " * 140]]})
    assert short.status_code == 200, short.text
    assert refused.status_code == 400 and "input[0] has 400 tokens" in refused.json()["error"]["message"]
    assert kept.status_code == 200, kept.text  # 280 tokens: truncated to max_length, as predict does
