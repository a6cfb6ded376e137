"""`softprompt serve` under bad requests, overload, hot loading, disconnects and an API key: a real uvicorn server on
127.0.0.1 with tiny models; every loop bounded in count and time; the test stops the server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from conftest import REPO
from serving_helpers import free_port, slow_decoding
from test_serve import _server

from softprompt_cli.serving.engine import Limits


@pytest.fixture(scope="module")
def lm_server(lm_checkpoints):
    with _server([f"{name}={path}" for name, path in lm_checkpoints.items()],
                 limits=Limits(max_batch_size=4, max_queue=3), max_tokens_limit=60, max_input_tokens=40) as server:
        yield server


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "pt", "prompt": "x"', 400, "not valid JSON"),
    ("/v1/completions", b'[1, 2]', 400, "must be a JSON object"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "pt, prefix, ptuning"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "max_tokens": 1000}, 400, "--max-tokens-limit"),
    ("/v1/completions", {"model": "pt", "prompt": "word " * 100}, 400, "--max-input-tokens"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "n": 2}, 400, "n:"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "logit_bias": {}}, 400, "logit_bias: not a field"),
    ("/v1/completions", {"model": "pt", "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "pt", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "pt", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/classify", {"model": "pt", "input": [["a", "b"]]}, 400, "reads a text per input"),
    ("/v1/classify", {"model": "pt", "input": []}, 400, "input"),
    ("/v1/classify", {"model": "pt", "input": [""]}, 400, "input[0]"),
    ("/v1/classify", {"model": "pt", "input": ["x", "word " * 41]}, 400, "input[1] has 41 tokens"),
    ("/v1/completions", b'{"model": "pt", "prompt": "a\\ud800b"}', 400, "unpaired surrogate (\\ud800)"),
    ("/v1/chat/completions", b'{"model": "pt", "messages": [{"role": "user", "content": "\\udc00"}]}', 400,
     "unpaired surrogate"),
    ("/v1/classify", b'{"model": "pt", "input": [["ok", "x\\ud83d"]]}', 400, "unpaired surrogate"),
    ("/v1/completions", {"model": "pt", "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/nothing", {}, 404, "no endpoint"),
    ("/admin/load", {"path": "x"}, 403, "--admin-root"),
]


@pytest.mark.parametrize("path,body,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_that_says_why(lm_server, path, body, status, message):
    with lm_server.client() as client:
        if isinstance(body, bytes):
            answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            answer = client.post(path, json=body)
        assert answer.status_code == status, answer.text
        assert message in answer.json()["error"]["message"]
        assert client.get("/health").json()["status"] == "ok"  # the server lives on


def test_bodies_are_bounded_before_they_are_read(lm_server):
    with lm_server.client() as client:
        big = client.post("/v1/completions", content=b"x" * (5 * 1024 * 1024),
                          headers={"Content-Type": "application/json"})
        assert big.status_code == 413
        chunked = client.post("/v1/completions", content=iter([b'{"model": "pt", ', b'"prompt": "x"}']))
        assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after(lm_server, monkeypatch):
    slow_decoding(monkeypatch, 0.01)
    body = {"model": "pt", "prompt": "what a", "max_tokens": 30, "temperature": 0}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=lm_server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(24)))

    answers = asyncio.run(flood())
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    assert 4 <= statuses.count(200) < 24
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["Retry-After"] == "1" and "busy" in refused.json()["error"]["message"]
    texts = {a.json()["choices"][0]["text"] for a in answers if a.status_code == 200}
    assert len(texts) == 1  # every admitted copy got the same answer
    with lm_server.client() as client:
        metrics = client.get("/metrics").text
    assert 'softprompt_requests_total{endpoint="/v1/completions",status="503"}' in metrics
    assert "softprompt_batch_size_bucket" in metrics and "softprompt_queue_depth" in metrics


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(lm_server, monkeypatch, stream):
    """Streamed or not: a non-streamed request's tokens keep arriving, and its client is still watched."""
    steps = slow_decoding(monkeypatch, 0.01 if stream else 0.05)
    body = {"model": "prefix", "prompt": "what a", "max_tokens": 60, "temperature": 0, "stream": stream,
            "stop": "never-appears"}
    if stream:
        with lm_server.client() as client, client.stream("POST", "/v1/completions", json=body) as answer:
            assert next(answer.iter_lines()).startswith("data: ")
    else:
        with lm_server.client(timeout=0.6) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body)
    deadline = time.monotonic() + 10
    with lm_server.client() as client:
        while client.get("/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["running"] == 0
    assert len(steps) < 50  # it stopped well before its 60 tokens


def test_api_key_is_required_on_every_endpoint(lm_checkpoints):
    with _server([f"pt={lm_checkpoints['pt']}"], api_key="s3cret") as server:
        with httpx.Client(base_url=server.url, timeout=30) as anonymous:
            for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                                 ("POST", "/v1/completions"), ("POST", "/v1/classify"), ("POST", "/admin/load")]:
                answer = anonymous.request(method, path, json={})
                assert answer.status_code == 401, path
                assert answer.headers["WWW-Authenticate"] == "Bearer"
            wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            not_ascii = anonymous.get("/v1/models", headers={"Authorization": "Bearer s3cr\u00e9t".encode()})
            assert not_ascii.status_code == 401
        with server.client() as client:
            assert client.get("/v1/models").status_code == 200


def test_hot_load_and_unload_while_serving(lm_checkpoints, tmp_path, monkeypatch):
    root = tmp_path / "prompts"
    shutil.copytree(lm_checkpoints["prefix"], root / "later")
    (tmp_path / "outside").mkdir()
    shutil.copytree(lm_checkpoints["ptuning"], tmp_path / "outside" / "best")
    (root / "linked_run").mkdir()  # a run folder whose best/ links out of the root
    (root / "linked_run" / "best").symlink_to(tmp_path / "outside" / "best")
    shutil.copytree(lm_checkpoints["ptuning"], root / "linked_file")  # its weights link out
    weights = next((root / "linked_file").glob("*.safetensors"))
    weights.unlink()
    weights.symlink_to(next((tmp_path / "outside" / "best").glob("*.safetensors")))

    with _server([f"pt={lm_checkpoints['pt']}"], admin_root=root) as server, server.client() as client:
        alone = client.post("/v1/completions", json={"model": "pt", "prompt": "what a", "max_tokens": 20,
                                                     "temperature": 0, "stop": "never-appears"}).json()
        slow_decoding(monkeypatch, 0.02)

        async def load_and_unload_during_a_generation():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                running = asyncio.create_task(http.post("/v1/completions", json={
                    "model": "pt", "prompt": "what a", "max_tokens": 20, "temperature": 0, "stop": "never-appears"}))
                await asyncio.sleep(0.1)
                loaded = await http.post("/admin/load", json={"path": "later", "name": "new"})
                used = await http.post("/v1/completions", json={"model": "new", "prompt": "x", "max_tokens": 2})
                unloaded = await http.post("/admin/unload", json={"name": "pt"})
                return loaded, used, unloaded, await running

        loaded, used, unloaded, finished = asyncio.run(load_and_unload_during_a_generation())
        assert loaded.status_code == 200 and loaded.json() == {"loaded": ["new"]}, loaded.text
        assert used.status_code == 200, used.text
        assert unloaded.status_code == 200
        assert finished.status_code == 200  # the request in flight on the unloaded prompt still completes
        assert finished.json()["choices"][0]["text"] == alone["choices"][0]["text"]
        assert client.post("/v1/completions", json={"model": "pt", "prompt": "x"}).status_code == 404
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][1:] == ["new"]
        for path in ["../outside", str(tmp_path / "outside"), "later/../../outside", "linked_run", "linked_file"]:
            refused = client.post("/admin/load", json={"path": path})
            assert refused.status_code == 403 and "outside the admin root" in refused.text, path
        assert client.post("/admin/load", json={"path": "a\u0000b"}).status_code == 400
        again = client.post("/admin/load", json={"path": "later", "name": "new"})
        assert again.status_code == 409
        (root / "empty").mkdir()
        assert client.post("/admin/load", json={"path": "empty"}).status_code == 400
        assert client.post("/admin/unload", json={"name": "pt"}).status_code == 404


def test_serve_from_the_command_line(lm_checkpoints, tmp_path):
    """The CLI starts a real server process on a free port; the test stops it."""
    folder = tmp_path / "prompts"
    for name in ("pt", "prefix"):
        shutil.copytree(lm_checkpoints[name].parent, folder / name)  # run folders: best/ or final/ inside
    port = free_port()
    env = {**os.environ, "SOFTPROMPT_API_KEY": "k"}
    process = subprocess.Popen([sys.executable, "-m", "softprompt_cli", "serve", str(folder), "--port", str(port)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, answer = time.monotonic() + 120, None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"},
                          timeout=10) as client:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    answer = client.get("/v1/models")
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            assert answer is not None and answer.status_code == 200, process.poll()
            assert [m["id"] for m in answer.json()["data"]][1:] == ["prefix", "pt"]
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving 2 soft prompt(s)" in output
    assert '"GET /v1/models HTTP/1.1" 200' in output  # the access log is on unless --no-access-log


def test_serving_starts_with_the_loaded_objects_frozen_and_options_passed(lm_checkpoints, run_cli, monkeypatch):
    """What was loaded is out of the garbage collector's reach before the first request (a full collection over it
    paused the server for ~0.4 s), and --no-access-log reaches uvicorn."""
    import gc

    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(options, frozen=gc.get_freeze_count()))
    try:
        code, _, err = run_cli("serve", str(lm_checkpoints["pt"]), "--port", str(free_port()), "--no-access-log")
    finally:
        gc.unfreeze()
    assert code == 0, err
    assert started["access_log"] is False and started["host"] == "127.0.0.1"
    assert started["frozen"] > 10_000


def test_serve_refuses_bad_checkpoints_before_listening(lm_checkpoints, classifiers, tmp_path, run_cli):
    code, _, err = run_cli("serve", str(tmp_path / "missing"))
    assert code == 2 and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("serve", str(tmp_path / "empty"))
    assert code == 2 and "holds no checkpoint" in err
    code, _, err = run_cli("serve", str(lm_checkpoints["pt"]), str(classifiers["mrpc_pt"]))
    assert code == 2 and "mix causal_lm and sequence_classification" in err
    remote = tmp_path / "remote"
    shutil.copytree(lm_checkpoints["pt"], remote)
    recipe = (remote / "recipe.yaml").read_text()
    (remote / "recipe.yaml").write_text(recipe.replace("trust_remote_code: false", "trust_remote_code: true"))
    code, _, err = run_cli("serve", str(remote))
    assert code == 2 and "never runs a model's own code" in err
    code, _, err = run_cli("serve", str(lm_checkpoints["pt"]), "--admin-root", str(tmp_path / "nope"),
                           "--port", str(free_port()))
    assert code == 2 and "--admin-root" in err
    code, _, err = run_cli("serve", str(lm_checkpoints["pt"]), "--device", "gpu")
    assert code == 2 and "--device 'gpu' is not auto, cpu, cuda or cuda:N" in err
    code, _, err = run_cli("serve", str(lm_checkpoints["pt"]), "--device", "cuda:7", "--port", str(free_port()))
    assert code == 2 and "--device cuda:7: torch cannot use that GPU" in err


def test_a_failure_outside_any_batch_fails_what_it_held_and_the_server_goes_on(lm_server, monkeypatch):
    """The engine thread survives an exception where no batch catches it (here: while merging new rows into a
    decoding batch, and while taking requests): the requests it held get an error, later ones are answered."""
    from softprompt_cli.model import lm
    from softprompt_cli.serving.engine import Engine

    def fail_once(owner, name, when=lambda *args: True):
        original, calls = getattr(owner, name), []

        def failing(*args, **kwargs):
            if not calls and when(*args):
                calls.append(1)
                raise RuntimeError(f"{name} failed")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, failing)

    slow_decoding(monkeypatch, 0.02)
    fail_once(lm, "merge_decoding")
    body = {"model": "pt", "prompt": "what a", "max_tokens": 12, "temperature": 0, "stop": "never-appears"}

    async def two_generations_that_meet() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=lm_server.url, timeout=60) as client:
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.sleep(0.15)  # the second joins the first's decoding batch
            return [await client.post("/v1/completions", json=body), await first]

    joined, running = asyncio.run(two_generations_that_meet())
    assert joined.status_code == running.status_code == 500
    assert "merge_decoding failed" in joined.json()["error"]["message"]
    # the idle loop calls it every IDLE_WAIT_S too: fail the call that holds the request
    fail_once(Engine, "_drop_cancelled", when=lambda engine: bool(engine._generations))
    with lm_server.client() as client:
        caught = client.post("/v1/completions", json=body)
        assert caught.status_code == 500 and "_drop_cancelled failed" in caught.json()["error"]["message"]
        assert client.post("/v1/completions", json=body).status_code == 200
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["waiting"] == health.json()["running"] == 0


def test_a_hot_load_builds_its_tasks_with_a_copy_of_the_tokenizer(lm_checkpoints, monkeypatch):
    """Each tokenizer call sets the shared fast tokenizer's truncation and padding, and requests tokenize on the event
    loop while a load runs on a worker thread: the load must not call the shared one."""
    from softprompt_cli.serving import registry as registry_module

    registry = registry_module.Registry([f"pt={lm_checkpoints['pt']}"])
    given, attach = [], registry_module.attach_tasks
    monkeypatch.setattr(registry_module, "attach_tasks", lambda *args: given.append(args[4]) or attach(*args))
    assert registry.load(lm_checkpoints["prefix"], "later") == ["later"]
    assert given[0] is not registry.tokenizer
    assert given[0]("what a film")["input_ids"] == registry.tokenizer("what a film")["input_ids"]


def test_max_tokens_left_out_follows_openai_within_the_servers_limit(lm_server, lm_checkpoints):
    """Completions: 16 (OpenAI's default), also for "max_tokens": null; chat: no default of its own, so up to the
    server's --max-tokens-limit (60 here) and the model's positions; both within a lower limit."""
    prompt = {"model": "pt", "prompt": "what a", "temperature": 0, "stop": "never-appears"}
    chat = {"model": "pt", "messages": [{"role": "user", "content": "what a"}], "temperature": 0}
    with lm_server.client() as client:
        for body in (prompt, {**prompt, "max_tokens": None}):
            answer = client.post("/v1/completions", json=body).json()
            length = answer["choices"][0]["finish_reason"] == "length"
            assert answer["usage"]["completion_tokens"] == 16 if length else answer["usage"]["completion_tokens"] < 16
        answer = client.post("/v1/chat/completions", json=chat).json()
        length = answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 60 if length else answer["usage"]["completion_tokens"] < 60
    with _server([f"pt={lm_checkpoints['pt']}"], max_tokens_limit=5) as server, server.client() as client:
        for path, body in (("/v1/completions", prompt), ("/v1/chat/completions", chat)):
            answer = client.post(path, json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] <= 5

