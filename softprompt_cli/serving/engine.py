"""The server's one worker thread: every forward pass of the shared frozen model runs here, so soft prompts
never run the model at the same time (nothing shared is mutated concurrently), and requests that arrive together
share forward passes.

Each turn of the loop: take new requests; run one classification batch (the oldest waiting inputs, of any soft
prompts that can share a pass); admit waiting generations into the running batches (their prefill) while there is
room; then one decode step for every running batch. A generation therefore joins rows that are already decoding
and never waits for them to finish; each row stops at its own end token, stop string or max_tokens.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from softprompt_cli.inference.batches import Collator, predict_batch
from softprompt_cli.model import lm
from softprompt_cli.serving.requests import Classification, Completion, Request

log = logging.getLogger("softprompt.serve")
IDLE_WAIT_S = 0.1
"""How long the idle loop waits for a request before it checks whether it should stop."""


class Overloaded(Exception):
    """The queue of waiting requests is full."""


@dataclass
class Limits:
    max_batch_size: int = 32
    """Rows per forward pass: classification inputs per batch, and generations decoding at once."""
    max_queue: int = 256
    """Requests waiting to start; more are refused (503) rather than queued without end."""
    one_prompt_per_batch: bool = False
    """Batch only requests of the same soft prompt together (for comparison: what adapter switching allows)."""


@dataclass
class RunningBatch:
    """Generations decoding together."""

    rows: list[Completion]
    state: lm.Decoding
    logits: torch.Tensor
    """Each row's next-token logits."""


class Engine:
    def __init__(self, model_of, tokenizer, limits: Limits, metrics, device: torch.device):
        """`model_of(completion)`: the SoftPromptModel that runs a completion (the base model's for task None)."""
        self.model_of = model_of
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.collate = Collator(tokenizer, device)
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._items: collections.deque = collections.deque()  # (request, index) of inputs to classify
        self._generations: collections.deque[Completion] = collections.deque()
        self._running: dict[tuple, RunningBatch] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)

    # ------------------------------------------------------------------ the HTTP side (event-loop thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue a request, or raise Overloaded when max_queue requests already wait."""
        with self._count_lock:
            if self._waiting >= self.limits.max_queue:
                raise Overloaded()
            self._waiting += 1
        self._inbox.put(request)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running_rows(self) -> int:
        """Rows decoding now (read from the event loop while the engine thread changes the batches: a snapshot)."""
        return sum(len(batch.rows) for batch in tuple(self._running.values()))

    # ------------------------------------------------------------------ the engine thread

    def _release(self, request: Request) -> None:
        """The request no longer waits (started, answered, failed or gone): once per request."""
        if request.released:
            return
        request.released = True
        with self._count_lock:
            self._waiting -= 1

    def _fail(self, request: Request, error: Exception) -> None:
        request.fail(error)
        request.cancelled = True  # its other inputs are dropped
        self._release(request)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._turn()
            except Exception as error:  # a bug or a failure outside a batch: fail what is in hand, keep serving
                log.exception("the engine failed a turn; failing the requests it held")
                self._fail_all(error)
        self._fail_all(RuntimeError("the server is shutting down"))  # nobody is left to read the rest

    def _turn(self) -> None:
        self._take_new(block=not (self._items or self._generations or self._running))
        self._drop_cancelled()
        if self._items:
            self._classify_once()
        if self._generations:
            self._admit()
        for key in list(self._running):
            self._step(key)
        self.metrics.observe_engine(self.waiting, self.running_rows)

    def _fail_all(self, error: Exception) -> None:
        held = [request for request, _ in self._items] + list(self._generations)
        held += [row for batch in self._running.values() for row in batch.rows]
        self._items, self._generations, self._running = collections.deque(), collections.deque(), {}
        for request in {id(request): request for request in held}.values():  # one item per classify input
            self._fail(request, error)

    def _take_new(self, block: bool) -> None:
        try:
            request = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(request, Classification):
                self._items.extend((request, index) for index in range(len(request.items)))
            else:
                self._generations.append(request)
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._generations if r.cancelled] + [r for r, _ in self._items if r.cancelled]:
            self._release(request)
        self._generations = collections.deque(r for r in self._generations if not r.cancelled)
        self._items = collections.deque((r, i) for r, i in self._items if not r.cancelled)

    def _batch_key(self, request: Classification, index: int) -> tuple:
        task = request.items[index].task
        return (task.name,) if self.limits.one_prompt_per_batch else task.batch_key

    def _classify_once(self) -> None:
        """One batch of the oldest waiting inputs that can share a forward pass."""
        key = self._batch_key(*self._items[0])
        chosen, kept = [], collections.deque()
        for request, index in self._items:
            if len(chosen) < self.limits.max_batch_size and self._batch_key(request, index) == key:
                chosen.append((request, index))
            else:
                kept.append((request, index))
        self._items = kept
        try:
            outputs = predict_batch([request.items[index] for request, index in chosen], self.collate)
        except Exception as error:  # a failed batch fails its requests, not the server
            for request, _ in chosen:
                self._fail(request, error)
            return
        self.metrics.observe_batch("classify", len(chosen))
        for (request, index), probabilities in zip(chosen, outputs):
            request.answer(index, probabilities)
            if request.remaining == 0:
                self._release(request)

    # ------------------------------------------------------------------ generation

    def _running_key(self, request: Completion) -> tuple:
        """Rows decoding together: one prefix length for prefix prompts (their prefix goes with every step),
        any input prompts (their virtual tokens are in the cache); or one soft prompt per batch."""
        kind, length = request.prompt_kind
        key = ("prefix", length) if kind == "prefix" else ("input",)
        return key + (request.task.name if request.task is not None else "",) if self.limits.one_prompt_per_batch \
            else key

    def _admit(self) -> None:
        """Start waiting generations while fewer than max_batch_size rows decode; each group of one prompt kind
        is prefilled in one pass and joins its running batch."""
        room = self.limits.max_batch_size - self.running_rows
        groups: dict[tuple, list[Completion]] = {}
        while self._generations and room > 0:
            request = self._generations.popleft()
            self._release(request)
            groups.setdefault((self._running_key(request), request.prompt_kind), []).append(request)
            room -= 1
        for (key, _), requests in groups.items():
            try:
                batch = self._prefill(requests)
            except Exception as error:  # e.g. out of memory: these requests fail, the server goes on
                for request in requests:
                    request.fail(error)
                continue
            self.metrics.observe_batch("prefill", len(requests))
            self._join(key, batch)

    def _join(self, key: tuple, batch: RunningBatch) -> None:
        """Prefilled rows join the batch decoding under `key` (or start it)."""
        running = self._running.setdefault(key, batch)
        if running is batch:
            return
        try:
            lm.merge_decoding(running.state, batch.state)
            running.logits = torch.cat([running.logits, batch.logits])
        except Exception as error:  # e.g. out of memory while the caches were half merged: neither can go on
            del self._running[key]
            for row in running.rows + batch.rows:
                row.fail(error)
            return
        running.rows += batch.rows

    def _prefill(self, requests: list[Completion]) -> RunningBatch:
        model = self.model_of(requests[0])
        batch = self.collate([{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids)}
                              for r in requests])
        prompts = [r.prompt for r in requests]
        if prompts[0] is None:
            prompt = None
        elif model.kind == "prefix":  # [layers, 2, 1, ...] each: one per row
            prompt = torch.cat(prompts, dim=2)
        else:
            prompt = torch.stack(prompts)
        state, logits = lm.prefill(model, batch["input_ids"], batch["attention_mask"], prompt)
        return RunningBatch(requests, state, logits)

    def _step(self, key: tuple) -> None:
        """Choose each row's next token, stream it, drop finished rows, and decode one step for the rest."""
        batch = self._running[key]
        try:
            tokens = self._choose(batch)
            keep = []
            for index, (row, token) in enumerate(zip(batch.rows, tokens.tolist())):
                if not row.cancelled:
                    row.emit(row.stream.accept(token))
                if row.stream.finish_reason is None and not row.cancelled:
                    keep.append(index)
            self.metrics.count_tokens(len(batch.rows))
            if not keep:
                del self._running[key]
                return
            if len(keep) < len(batch.rows):
                rows = torch.tensor(keep, device=tokens.device)
                lm.keep_rows(batch.state, rows)
                batch.rows = [batch.rows[i] for i in keep]
                tokens = tokens[rows]
            model = self.model_of(batch.rows[0])
            batch.logits = lm.decode_step(model, batch.state, tokens)
            self.metrics.observe_batch("decode", len(batch.rows))
        except Exception as error:
            del self._running[key]
            for row in batch.rows:
                row.fail(error)

    def _choose(self, batch: RunningBatch) -> torch.Tensor:
        """Each row's next token: greedy, or sampled with the row's own settings and generator."""
        tokens = batch.logits.argmax(-1)
        for index, row in enumerate(batch.rows):
            if row.sampling is not None:
                tokens[index] = row.sampling.choose(batch.logits[index:index + 1].float())[0]
        return tokens
