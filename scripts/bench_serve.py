"""`softprompt serve` under concurrent clients, against the same server batching one soft prompt at a time and
against what PEFT users serve today; loopback only, every run bounded.

    python scripts/bench_serve.py                        # 1/4/16/64 clients, both models (~12 min on 2 cores)
    python scripts/bench_serve.py --quick                # smoke run: 1 and 4 clients, few requests
    python scripts/bench_serve.py --models minilm --clients 16 --requests 64
    python scripts/bench_serve.py --models minilm --compute-free --requests 512   # the servers' own overhead

Soft prompts: 8 prompt-tuning checkpoints on SmolLM2-135M-Instruct (causal_lm, from recipes/
sst2_smollm2_prompt_tuning.yaml with init: sample_vocab) and 8 on all-MiniLM-L6-v2 (classification, from
recipes/mrpc_prompt_tuning.yaml with task.pooling: model and task.prompt_position: start, PEFT's layout). They are
not trained: each is its method's start from another seed (MiniLM: each with a classifier head of its own), written
as checkpoints (softprompt) and as PEFT adapters into --work-dir (default runs/bench_serve, reused when present).

Setups, each a server started on 127.0.0.1 on a free port and stopped by this script:
  (a) server       softprompt serve NAME=DIR ... (rows of all soft prompts share forward batches)
  (b) one-prompt   softprompt serve --one-prompt-per-batch (the same server, one soft prompt per batch)
  (c) peft         scripts/peft_serve_app.py: FastAPI + uvicorn around a PeftModel with the 8 adapters; each
                   request takes a lock, calls set_adapter(name) and runs alone (PeftModel.generate, with a
                   fix without which PEFT 0.21.2 generates wrong text on transformers 5: see that script)
Load: N concurrent clients (asyncio + aiohttp), requests spread round-robin over the 8 soft prompts and a fixed list of
inputs: SST-2 dev sentences in the recipe's template ("Review: ...\\nSentiment:", max_tokens 8, temperature 0) to
/v1/completions for SmolLM2, MRPC dev pairs (one per request) to /v1/classify for MiniLM. Every (setup, clients)
cell sends the same requests (--requests, default max(2 * clients, 32)), after a warm-up of one request per soft
prompt, under a wall-clock cap (--cell-timeout). Reported: requests/s, p50 and p99 latency, and whether each answer is
the one (c) gave for the same (soft prompt, input): same generated text; same label and probabilities within
--atol. A setup that fails prints a failed row; the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUM_PROMPTS = 8
SETUPS = {"a": "server", "b": "one-prompt", "c": "peft"}
HEALTH_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BenchModel:
    key: str
    recipe: str
    overrides: tuple[str, ...]
    endpoint: str  # "completions" or "classify"


MODELS = {
    "smollm2": BenchModel("smollm2", "recipes/sst2_smollm2_prompt_tuning.yaml",
                          ("method.init=sample_vocab", "method.init_text=null"), "completions"),
    "minilm": BenchModel("minilm", "recipes/mrpc_prompt_tuning.yaml",
                         ("task.pooling=model", "task.prompt_position=start"), "classify"),
}


DEV_DATA = {"completions": "SST-2/dev.tsv", "classify": "MRPC/dev.tsv"}
"""The inputs of each model's requests, under --glue-dir."""


def resolved_device(option: str) -> str:
    """--device as every server gets it: auto becomes cuda or cpu here, once (the PEFT app takes no auto)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if option == "auto" else option


def device_name(device: str) -> str:
    """The device the servers run on, in words (a GPU by its name)."""
    import torch

    return "CPU" if device == "cpu" else torch.cuda.get_device_name(torch.device(device))


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------- soft prompts

def prompt_names(model: BenchModel) -> list[str]:
    return [f"{model.key}-{i}" for i in range(NUM_PROMPTS)]


def checkpoint_dir(work: Path, model: BenchModel, name: str) -> Path:
    return work / model.key / "checkpoints" / name


def adapter_dir(work: Path, model: BenchModel, name: str) -> Path:
    return work / model.key / "peft" / name


def manifest_path(work: Path, model: BenchModel) -> Path:
    return work / model.key / "manifest.json"


def manifest(model: BenchModel) -> dict:
    return {"recipe": model.recipe, "overrides": list(model.overrides), "prompts": prompt_names(model), "version": 2}


def prepared(work: Path, model: BenchModel) -> bool:
    path = manifest_path(work, model)
    if not path.is_file():
        return False
    try:
        if json.loads(path.read_text()) != manifest(model):
            return False
    except ValueError:
        return False
    return all((checkpoint_dir(work, model, n) / "checkpoint.json").is_file()
               and (adapter_dir(work, model, n) / "adapter_config.json").is_file() for n in prompt_names(model))


def write_adapter(out: Path, recipe, soft_model, labels: list[str]) -> None:
    """A PEFT adapter of a soft-prompt model with the package's own conversion (`write_peft_adapter` refuses models
    loaded from GGUF, which PEFT cannot load by name; here PEFT gets the dequantized model itself)."""

    from softprompt_cli.artifacts.peft import write_adapter_files, write_peft_adapter

    if recipe.model.gguf_file is None:
        write_peft_adapter(out, out.name, recipe, soft_model, labels)
        return
    write_adapter_files(out, recipe, soft_model, labels)  # export refuses GGUF; PEFT here runs on the same weights


def prepare(work: Path, model: BenchModel, model_path: str | None) -> None:
    """8 untrained soft prompts (seeds 0-7) on one loaded base model, as checkpoints and as PEFT adapters."""
    if prepared(work, model):
        say(f"[{model.key}] reusing the soft prompts in {work / model.key}")
        return
    import torch

    from softprompt_cli.artifacts.checkpoint import write_checkpoint
    from softprompt_cli.assemble import build_model, load_frozen
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.data.glue import GLUE_TASKS
    from softprompt_cli.model.loading import config_fingerprint, model_head

    started = time.perf_counter()
    location = [f"model.name_or_path={model_path}"] if model_path else []
    recipe = load_recipe(REPO / model.recipe, [*model.overrides, *location, f"output.dir={work / model.key}"])
    labels = list(GLUE_TASKS[recipe.data.glue_task].label_names)
    base, tokenizer = load_frozen(recipe, labels)
    base.eval()
    fingerprint = config_fingerprint(base.config)
    for seed, name in enumerate(prompt_names(model)):
        torch.manual_seed(seed)
        soft_model, _ = build_model(recipe, labels, base, tokenizer)
        if recipe.model_task.pooling == "model" and recipe.model_task.type != "causal_lm":
            _, head = model_head(base)  # the base model's own head is shared: give each prompt its own
            with torch.no_grad():
                for parameter in head.parameters():
                    parameter.normal_(0.0, 0.2)
        state = soft_model.trainable_state()
        info = {  # what training's save_checkpoint writes, for a run of 0 steps
            "method": recipe.method.model_dump(mode="json"),
            "label_names": labels,
            "tasks": {recipe.task_names[0]: labels},
            "pooling": recipe.model_task.pooling,
            "base_model": {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
                           "fingerprint": fingerprint},
            "step": 0, "epoch": 0.0, "metrics": {},
            "trainable_parameters": sum(t.numel() for t in state.values()),
        }
        write_checkpoint(checkpoint_dir(work, model, name), state, info, recipe.to_yaml())
        write_adapter(adapter_dir(work, model, name), recipe, soft_model, labels)
    manifest_path(work, model).write_text(json.dumps(manifest(model), indent=2) + "\n")
    say(f"[{model.key}] wrote {NUM_PROMPTS} checkpoints and PEFT adapters into {work / model.key} "
        f"({time.perf_counter() - started:.0f} s)")


def recipe_model(model: BenchModel) -> tuple[str, str | None]:
    """Where the recipe's base model is on this machine (a hub id resolved offline), and its GGUF file if any."""
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.hub import resolve_model_reference

    spec = load_recipe(REPO / model.recipe).model
    return resolve_model_reference(spec.name_or_path, spec.revision, spec.gguf_file)[0], spec.gguf_file


COMPUTE_FREE_SHAPE = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2}
"""48-wide layers, and 2 heads of 24: with MiniLM's 12 heads of 4, the attention's softmax over 12 score matrices
per layer was half of a batch's time on the CPU, so the "compute-free" model was not."""
COMPUTE_FREE_DIR = "compute-free-h48-i96-a2"
"""Named after the shape, so that soft prompts written for another shape are never reused."""


def compute_free_base(work: Path) -> str:
    """A random-weight model with MiniLM's architecture, tokenizer and layers, but 48-wide layers with 2 heads: its
    forward pass costs next to nothing, so the servers are measured by their own overhead, as on a fast GPU. Written
    once under `work`."""
    folder = work / "compute-free-base"
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    source = recipe_model(MODELS["minilm"])[0]
    config = AutoConfig.from_pretrained(source)
    for name, value in COMPUTE_FREE_SHAPE.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    partial = folder.with_name(folder.name + ".partial")
    BertModel(config).save_pretrained(partial)
    AutoTokenizer.from_pretrained(source).save_pretrained(partial)
    partial.rename(folder)  # config.json appears only with the whole folder
    return str(folder)


# ---------------------------------------------------------------------------------------------------- requests

def inputs_for(model: BenchModel, glue_dir: Path, count: int) -> list:
    """The fixed list of inputs: templated SST-2 sentences (SmolLM2) or MRPC sentence pairs (MiniLM)."""
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.data.sources import read_table

    if model.endpoint == "completions":
        template = load_recipe(REPO / model.recipe).task.template
        rows = read_table(glue_dir / DEV_DATA[model.endpoint], "tsv")[:count]
        return [template.format(sentence=row["sentence"]) for row in rows]
    rows = read_table(glue_dir / DEV_DATA[model.endpoint], "tsv")[:count]
    return [[row["#1 String"], row["#2 String"]] for row in rows]


def request_for(model: BenchModel, names: list[str], inputs: list, index: int) -> tuple[tuple[int, int], str, dict]:
    """Request `index` of a cell: (its (prompt, input) key, path, JSON body). The number of inputs is odd, so the
    pairs cycle through every soft prompt with every input."""
    prompt, item = index % len(names), index % len(inputs)
    if model.endpoint == "completions":
        body = {"model": names[prompt], "prompt": inputs[item], "max_tokens": 8, "temperature": 0, "stream": False}
        return (prompt, item), "/v1/completions", body
    return (prompt, item), "/v1/classify", {"model": names[prompt], "input": [inputs[item]]}


def answer_of(model: BenchModel, payload: dict):
    """What must be identical across setups: the generated text, or the label and probabilities."""
    if model.endpoint == "completions":
        return payload["choices"][0]["text"]
    row = payload["data"][0]
    return row["label"], {k: float(v) for k, v in row["probabilities"].items()}


def same_answer(model: BenchModel, a, b, atol: float) -> bool:
    if model.endpoint == "completions":
        return a == b
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(abs(a[1][k] - b[1][k]) <= atol for k in a[1])


class Refused(Exception):
    """The server answered a status other than 200 (503s are retried first)."""


async def send(session, path: str, body: dict, deadline: float) -> tuple[float, dict, int]:
    """(latency, JSON answer, 503 retries) of one request; a 503 (queue full) is retried after Retry-After, its wait
    counted in the latency."""
    started = time.perf_counter()
    retries = 0
    while True:
        async with session.post(path, json=body) as response:
            status, retry_after, text = response.status, response.headers.get("retry-after", "1"), await response.text()
        if status == 503 and time.perf_counter() < deadline:
            retries += 1
            await asyncio.sleep(min(float(retry_after or 1), 5.0))
            continue
        if status != 200:
            raise Refused(f"HTTP {status}: {text[:120]}")
        return time.perf_counter() - started, json.loads(text), retries


def client_session(base_url: str, connections: int):
    """The load generator's HTTP client: aiohttp. httpx's async client was the bottleneck here: on the 2-core CPU it
    answered ~430 requests/s at 16 connections and ~160 at 64 against a FastAPI app that returns a constant, where
    aiohttp reached ~3,300 and ~3,000, so every fast server looked slow, and slower with more clients."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=10.0)
    return aiohttp.ClientSession(base_url=base_url, timeout=timeout,
                                 connector=aiohttp.TCPConnector(limit=connections), trust_env=False)


@dataclass
class Cell:
    model: str
    setup: str
    clients: int
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    retries: int = 0
    failures: int = 0
    first_failure: str | None = None
    error: str | None = None
    answers: dict = field(default_factory=dict)
    same: int | None = None  # answers identical to (c)'s
    compared: int = 0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def run_cell(base_url: str, model: BenchModel, names: list[str], inputs: list, cell: Cell,
                   cell_timeout: float) -> None:
    import aiohttp

    counter = iter(range(cell.requests))
    started = time.perf_counter()
    deadline = started + cell_timeout

    async with client_session(base_url, cell.clients + 4) as client:
        async def worker() -> None:
            for index in counter:
                if time.perf_counter() > deadline:
                    return
                key, path, body = request_for(model, names, inputs, index)
                try:
                    latency, payload, retries = await send(client, path, body, deadline)
                    answer = answer_of(model, payload)
                except (aiohttp.ClientError, asyncio.TimeoutError, Refused, ValueError, KeyError, IndexError,
                        TypeError) as err:
                    cell.failures += 1
                    cell.first_failure = cell.first_failure or f"{type(err).__name__}: {err}"[:200]
                    continue
                cell.latencies.append(latency)
                cell.retries += retries
                cell.answers.setdefault(key, answer)

        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(cell.clients))),
                                   timeout=cell_timeout + REQUEST_TIMEOUT_S)
        finally:
            cell.seconds = time.perf_counter() - started
    if cell.failures:
        cell.error = f"{cell.failures}/{cell.requests} requests failed ({cell.first_failure})"
    elif len(cell.latencies) < cell.requests:
        cell.error = f"only {len(cell.latencies)}/{cell.requests} requests within the {cell_timeout:.0f} s cap"


async def warm_up(base_url: str, model: BenchModel, names: list[str], inputs: list) -> None:
    async with client_session(base_url, 1) as client:
        for index in range(len(names)):
            _, path, body = request_for(model, names, inputs, index)
            await send(client, path, body, time.perf_counter() + REQUEST_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(setup: str, model: BenchModel, work: Path, port: int, args) -> list[str]:
    names = prompt_names(model)
    if setup in ("a", "b"):
        command = [sys.executable, "-m", "softprompt_cli", "serve",
                   *(f"{n}={checkpoint_dir(work, model, n)}" for n in names),
                   "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
                   "--device", args.device, "--no-access-log"]  # (c) logs no requests either
        command += ["--model", args.model_path] if args.model_path else []
        return command + (["--one-prompt-per-batch"] if setup == "b" else [])
    location, gguf_file = recipe_model(model)
    command = [sys.executable, str(REPO / "scripts" / "peft_serve_app.py"), "--base", args.model_path or location,
               "--port", str(port), "--device", args.device]
    if gguf_file:
        command += ["--gguf-file", gguf_file]
    return command + [arg for n in names for arg in ("--adapter", f"{n}={adapter_dir(work, model, n)}")]


@contextlib.contextmanager
def running_server(command: list[str], port: int, log: Path, threads: int = 0):
    """Start a server subprocess, wait (bounded) for GET /health, stop it whatever happens."""
    import httpx

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.perf_counter() + HEALTH_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"exited with code {process.returncode} before it was ready: "
                                       f"{tail(log)} (log: {log})")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"not ready after {HEALTH_TIMEOUT_S:.0f} s (log: {log})")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                        break
                time.sleep(0.5)
            yield url
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)


def tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-600:]


# ---------------------------------------------------------------------------------------------------- reporting

def row_text(cell: Cell) -> str:
    identical = "-" if cell.same is None else f"{cell.same}/{cell.compared}"
    label = f"({cell.setup}) {SETUPS[cell.setup]}"
    if cell.error and not cell.latencies:
        return f"| {cell.model} | {label} | {cell.clients} | failed | - | - | - | {cell.error} |"
    note = cell.error or (f"{cell.retries} retries after 503" if cell.retries else "")
    return (f"| {cell.model} | {label} | {cell.clients} | {cell.rps:.1f} | {1000 * cell.percentile(0.5):.0f} | "
            f"{1000 * cell.percentile(0.99):.0f} | {identical} | {note} |")


HEADER = ("| model | setup | clients | req/s | p50 ms | p99 ms | identical to (c) | note |\n"
          "|---|---|---|---|---|---|---|---|")


def compare_answers(model: BenchModel, cells: list[Cell], atol: float) -> None:
    """Each cell's answers against (c)'s for the same (soft prompt, input); (c) is also checked against itself."""
    reference: dict = {}
    for cell in cells:
        if cell.setup == "c":
            for key, answer in cell.answers.items():
                reference.setdefault(key, answer)
    for cell in cells:
        keys = [k for k in cell.answers if k in reference]
        cell.compared = len(keys)
        cell.same = sum(same_answer(model, cell.answers[k], reference[k], atol) for k in keys) if reference else None


def mismatch_examples(model: BenchModel, cells: list[Cell], atol: float, names: list[str], inputs: list,
                      limit: int = 3) -> list[str]:
    reference = {k: v for c in cells if c.setup == "c" for k, v in c.answers.items()}
    shown, seen = [], set()
    for cell in cells:
        for key, answer in cell.answers.items():
            if key in reference and key not in seen and not same_answer(model, answer, reference[key], atol):
                seen.add(key)
                text = inputs[key[1]]
                shown.append(f"  ({cell.setup}) {cell.clients} clients, {names[key[0]]}, input {key[1]} "
                             f"{str(text)[:60]!r}: {answer!r} vs (c) {reference[key]!r}")
                if len(shown) == limit:
                    return shown
    return shown


# ---------------------------------------------------------------------------------------------------- main

def bench_model(model: BenchModel, args) -> list[Cell]:
    names = prompt_names(model)
    inputs = inputs_for(model, args.glue_dir, args.inputs)
    cells: list[Cell] = []
    for setup in args.setups:
        port = free_port()
        log = args.work_dir / "logs" / f"{model.key}-{SETUPS[setup]}.log"
        command = server_command(setup, model, args.work_dir, port, args)
        started = time.perf_counter()
        setup_cells = [Cell(model.key, setup, n, args.requests or max(2 * n, 32)) for n in args.clients]
        try:
            with running_server(command, port, log, args.threads) as url:
                say(f"[{model.key}] ({setup}) {SETUPS[setup]} ready in {time.perf_counter() - started:.0f} s")
                asyncio.run(warm_up(url, model, names, inputs))
                for cell in setup_cells:
                    try:
                        asyncio.run(run_cell(url, model, names, inputs, cell, args.cell_timeout))
                    except Exception as err:  # noqa: BLE001 - a failed cell is reported, the others still run
                        cell.error = f"{type(err).__name__}: {err}"[:300]
                    cells.append(cell)
                    say(row_text(cell))
        except Exception as err:  # noqa: BLE001 - a setup that fails prints failed rows, the others still run
            for cell in setup_cells:
                if cell not in cells:
                    cell.error = f"{type(err).__name__}: {err}"[:300]
                    cells.append(cell)
                    say(row_text(cell))
    compare_answers(model, cells, args.atol)
    for line in mismatch_examples(model, cells, args.atol, names, inputs):
        say(line)
    return cells


def summary(all_cells: list[Cell], args) -> str:
    lines = [HEADER, *(row_text(c) for c in all_cells)]
    ratios, goals = [], []
    for key in dict.fromkeys(c.model for c in all_cells):
        for clients in args.clients:
            found = {c.setup: c for c in all_cells if c.model == key and c.clients == clients and c.latencies}
            if "a" not in found or "c" not in found or not found["c"].rps:
                continue
            a, c = found["a"], found["c"]
            versus_b = f"{a.rps / found['b'].rps:.2f}x" if found.get("b") and found["b"].rps else "-"
            ratios.append(f"| {key} | {clients} | {a.rps / c.rps:.2f}x | {versus_b} | "
                          f"{1000 * a.percentile(0.99):.0f} vs {1000 * c.percentile(0.99):.0f} |")
            if clients == 16:
                met = a.rps >= 3 * c.rps and a.percentile(0.99) < c.percentile(0.99) and not a.error
                goals.append(f"{key} at 16 clients: {a.rps / c.rps:.2f}x the requests/s of (c) (goal >= 3x), p99 "
                             f"{1000 * a.percentile(0.99):.0f} ms vs {1000 * c.percentile(0.99):.0f} ms (goal: below)"
                             f": {'met' if met else 'NOT met'}")
    if ratios:
        lines += ["", "| model | clients | req/s (a)/(c) | req/s (a)/(b) | p99 ms (a) vs (c) |",
                  "|---|---|---|---|---|", *ratios]
    if goals:
        lines += ["", *goals]
    compared = [c for c in all_cells if c.same is not None and c.setup != "c"]
    if compared:
        mismatches = sum(c.compared - c.same for c in compared)
        lines += ["", f"answers of (a) and (b) that differ from (c)'s for the same soft prompt and input: {mismatches}"
                      f" of {sum(c.compared for c in compared)} (labels and probabilities within {args.atol:g}, "
                      "generated text exactly)"]
    requests = args.requests or "max(2 x clients, 32)"
    lines += ["", f"{requests} requests per cell after a warm-up of {NUM_PROMPTS}; p99 of so few requests is about "
                  f"their slowest; {os.cpu_count()} CPUs, torch threads: {args.threads or 'default'}; device: "
                  f"{device_name(args.device)}"
                  f"{'; compute-free base (--compute-free)' if args.compute_free else ''}."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default=None, help="comma-separated client counts (default 1,4,16,64)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per (setup, clients) cell (default max(2 * clients, 32))")
    parser.add_argument("--models", default="smollm2,minilm", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--setups", default="a,b,c", help="comma-separated, of a (server), b (one prompt per "
                        "batch), c (PEFT app)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_serve")
    parser.add_argument("--glue-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue")
    parser.add_argument("--inputs", type=int, default=63, help="how many dev inputs to cycle through (made odd)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's --max-batch-size")
    parser.add_argument("--cell-timeout", type=float, default=180.0, help="wall-clock cap of a cell, in seconds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of every server (OMP_NUM_THREADS; default: torch's own choice)")
    parser.add_argument("--atol", type=float, default=1e-4, help="tolerance on classification probabilities")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 16 requests per cell")
    parser.add_argument("--device", default="auto", help="where every server runs its model: auto (a GPU when "
                        "torch sees one), cpu, cuda or cuda:N")
    parser.add_argument("--model-path", help="the base model's folder for every setup (a local copy of the "
                        "recipe's model; the soft prompts in --work-dir are written for it if missing)")
    parser.add_argument("--compute-free", action="store_true", help="MiniLM only: every setup serves a random model of "
                        "its architecture with 48-wide layers (under --work-dir), so that the servers' own overhead "
                        "is measured, as on a fast GPU")
    args = parser.parse_args(argv)
    args.clients = [int(n) for n in (args.clients or ("1,4" if args.quick else "1,4,16,64")).split(",")]
    if args.quick and args.requests is None:
        args.requests = 16
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if unknown or not args.models or any(s not in SETUPS for s in args.setups) or not args.setups:
        parser.error(f"--models takes {', '.join(MODELS)}; --setups takes {', '.join(SETUPS)}")
    if min(args.clients) < 1 or (args.requests is not None and args.requests < 1) or args.inputs < 1:
        parser.error("--clients, --requests and --inputs must be positive")
    if args.compute_free and (args.models != ["minilm"] or args.model_path):
        parser.error("--compute-free measures the classification servers: give it with --models minilm and no "
                     "--model-path")
    args.inputs += 1 - args.inputs % 2  # odd: coprime with the 8 soft prompts
    args.work_dir = args.work_dir.resolve() / (COMPUTE_FREE_DIR if args.compute_free else "")
    args.device = resolved_device(args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    needed = [args.glue_dir / DEV_DATA[MODELS[key].endpoint] for key in args.models]
    if not all(path.is_file() for path in needed):
        say(f"no GLUE data in {args.glue_dir} ({', '.join(str(p.relative_to(args.glue_dir)) for p in needed)}); "
            "give --glue-dir")
        return 2
    say(f"bench_serve: models {', '.join(args.models)}; setups {', '.join(SETUPS[s] for s in args.setups)}; "
        f"clients {', '.join(map(str, args.clients))}; {os.cpu_count()} CPUs; work dir {args.work_dir}")
    if args.compute_free:
        args.model_path = compute_free_base(args.work_dir)
    all_cells: list[Cell] = []
    for key in args.models:
        model = MODELS[key]
        try:
            prepare(args.work_dir, model, args.model_path)
        except Exception as err:  # noqa: BLE001
            say(f"[{key}] could not write the soft prompts: {type(err).__name__}: {err}")
            for setup in args.setups:
                for clients in args.clients:
                    cell = Cell(key, setup, clients, error=f"no soft prompts ({type(err).__name__})")
                    all_cells.append(cell)
            continue
        say(HEADER)
        all_cells += bench_model(model, args)
    say("")
    say(summary(all_cells, args))
    return 0 if all(c.error is None for c in all_cells) else 1


if __name__ == "__main__":
    sys.exit(main())
