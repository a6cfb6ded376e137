"""softprompt against Hugging Face PEFT on the same job, measured side by side in one invocation.

    python scripts/bench_vs_peft.py            # MiniLM on MRPC: ~20 minutes on a 2-core CPU
    python scripts/bench_vs_peft.py --epochs 5 --max-train-samples 0 --repeats 1       # the full MRPC job
    python scripts/bench_vs_peft.py --job smollm2-sst2 --repeats 1 --one-process-batches 40   # ~1.5 hours
    python scripts/bench_vs_peft.py --job smollm2-sst2 --repeats 0 --one-process-batches 20   # ratios alone

Jobs (--job):
- minilm-mrpc: the packaged MiniLM (sentence-transformers/all-MiniLM-L6-v2) on GLUE MRPC, each method with
  PEFT's example hyperparameters (batch 16, max length 128, the model's own classification head). PEFT runs the
  loop of its example examples/sequence_classification/peft_no_lora_accelerate.py (shuffled batches padded to
  their longest row).
- smollm2-sst2: SmolLM2-135M-Instruct (from its GGUF file, dequantized to float32) writes " negative" or
  " positive" after recipes/sst2_smollm2_prompt_tuning.yaml's template (batch 16, max length 96, 10 virtual
  tokens). The loss is on the label word alone, rows are padded on the left, and dev accuracy ranks the two
  words. PEFT's CAUSAL_LM methods run a plain PyTorch loop (scripts/peft_baselines.py) with shuffled batches.
softprompt runs `softprompt train` with the batches its default (`group_by_length: auto`) gives on a CPU: batches of
similar lengths for MiniLM, shuffled batches (as PEFT's) for SmolLM2, whose rows softprompt packs without padding.
Both tools train on the same examples (softprompt's tokenization) with the same AdamW settings: learning rate,
--weight-decay, linear warmup over 6% of the steps, and gradient clipping at --max-grad-norm.

Every run is a fresh process with the same number of threads; runs alternate A B B A so that drift of the
machine hits both. Right after training, each softprompt process measures the floor: forward + backward through
the bare frozen model on the same batches, lengthened by the virtual tokens, with no prompt machinery at all.
Last, one process per method takes both tools' training steps in turn, batch by batch, through one epoch (or
its first --one-process-batches batches): softprompt's step on its batch, PEFT's on its own batch, and PEFT's
on softprompt's batch (the same tensors).
"ratio, one process" (each tool on its own batches) is then a ratio that no drift of the machine between runs
can touch, and "ratio, identical batches" shows the speed that comes from work softprompt avoids, not from
padding. Where softprompt skips work on a given batch (BERT-family models: the last layer for [CLS] alone;
decoders: leading tokens that all rows share, run once, the last layer's feed-forward half for the columns the
loss reads alone, and the rows packed without padding behind the prefix they share), its step also runs with those
shortcuts off (in brackets); where it packs rows, also with packing alone off ("rows padded": PEFT's step on the
same padded rows against softprompt's, the speed that does not come from padding). Besides dev accuracy, both
report their mean training loss over the last epoch: a short budget can leave both at the majority class, and
the loss still shows whether they learn alike.

Each method's row is printed as soon as the method is done. A side that fails shows "failed" in its cells (the
reasons follow the table) and the rest of the row and the other methods are kept; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft_baselines import (
    PREDICTS_LABEL_WORD,
    PeftRun,
    build_peft_run,
    peft_epoch,
    peft_evaluation,
    peft_train_step,
    plain_model,
    plain_tokenizer,
)

from softprompt_cli.config.load import parse_recipe
from softprompt_cli.config.schema import Recipe
from softprompt_cli.data.batching import training_loader
from softprompt_cli.data.tasks import load_task_data
from softprompt_cli.training.loop import Run, make_accelerator, set_up, train, train_step


@dataclass(frozen=True)
class MethodSettings:
    virtual_tokens: int
    lr: float
    softprompt: dict = field(default_factory=dict)
    """Extra softprompt method options."""
    peft: dict = field(default_factory=dict)
    """Extra PEFT config fields."""


@dataclass(frozen=True)
class Job:
    title: str
    sections: dict
    """The recipe's model, data and task sections (both tools train from the one recipe)."""
    split_rows: int
    """Rows in the training split."""
    default_rows: int
    eval_batch_size: int
    methods: dict[str, MethodSettings]
    group_by_length: str
    """softprompt's training.group_by_length (on / off), as `auto` sets it for the model on a CPU."""


SST2_INIT_TEXT = "Classify the sentiment of the movie review as positive or negative."
JOBS = {
    "minilm-mrpc": Job(
        "MiniLM-L6 on MRPC", {"model": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2"},
                              "data": {"glue_task": "mrpc"}},
        split_rows=3668, default_rows=800, eval_batch_size=64,
        methods={"prompt_tuning": MethodSettings(10, 1e-2),  # PEFT's examples: tokens, learning rate, encoder
                 "p_tuning": MethodSettings(20, 1e-2, {"encoder_hidden_size": 128}, {"encoder_hidden_size": 128}),
                 "prefix_tuning": MethodSettings(20, 1e-2)}, group_by_length="on"),
    "smollm2-sst2": Job(
        "SmolLM2-135M-Instruct (causal LM) on SST-2",
        {"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
         "data": {"glue_task": "sst2", "max_length": 96},
         "task": {"type": "causal_lm", "template": "Review: {sentence}\nSentiment:",
                  "label_words": {"negative": " negative", "positive": " positive"}}},
        split_rows=67349, default_rows=2000, eval_batch_size=32,
        # prompt tuning as recipes/sst2_smollm2_prompt_tuning.yaml; the others at MiniLM's learning rate
        methods={"prompt_tuning": MethodSettings(10, 3e-2, {"init": "text", "init_text": SST2_INIT_TEXT},
                                                 {"prompt_tuning_init": "TEXT",
                                                  "prompt_tuning_init_text": SST2_INIT_TEXT}),
                 "p_tuning": MethodSettings(10, 1e-2, {"encoder_hidden_size": 128}, {"encoder_hidden_size": 128}),
                 # from zero keys and values (both tools offer it): random ones, their default, start at loss 7
                 # against 5 from zero
                 "prefix_tuning": MethodSettings(10, 1e-2, {"init": "zero"}, {"init_weights": "zero"})},
        # shuffled batches, as group_by_length: auto gives SmolLM2 on a CPU (softprompt packs their rows)
        group_by_length="off"),
}
BATCH_SIZE = 16
SHORTCUT_OFF = "softprompt, shortcut off"
ROWS_PADDED = "softprompt, rows padded"
PEFT_ON_OUR_BATCH = "peft, softprompt's batch"
STEP_KINDS = ("softprompt", "peft", PEFT_ON_OUR_BATCH, SHORTCUT_OFF, ROWS_PADDED)
"""What the one-process worker times, batch by batch: the last two only where softprompt has shortcuts (every one
off) and packs rows (packing alone off: the work it avoids on the same batches that is not padding)."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_rows(args) -> int:
    job = JOBS[args.job]
    return min(args.max_train_samples, job.split_rows) if args.max_train_samples else job.split_rows


def bench_recipe(args, out: str | None) -> Recipe:
    """The one recipe both tools train from (`out`: softprompt's output folder)."""
    job, settings = JOBS[args.job], JOBS[args.job].methods[args.method]
    sections = copy.deepcopy(job.sections)
    sections["data"] |= {"dir": str(args.glue_dir), "max_train_samples": args.max_train_samples or None,
                         "max_eval_samples": args.max_eval_samples or None}
    return parse_recipe({
        **sections,
        "method": {"name": args.method, "num_virtual_tokens": settings.virtual_tokens, **settings.softprompt},
        "training": {"lr": settings.lr, "batch_size": BATCH_SIZE, "eval_batch_size": job.eval_batch_size,
                     "epochs": args.epochs, "seed": args.seed, "weight_decay": args.weight_decay,
                     "max_grad_norm": args.max_grad_norm or None, "group_by_length": args.group_by_length == "on",
                     "mixed_precision": "no",  # float32, as PEFT's side runs
                     # one log record per epoch: its mean training loss
                     "log_steps": math.ceil(training_rows(args) / BATCH_SIZE)},
        "output": {"dir": out},
    })


def worker_softprompt(args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        recipe = bench_recipe(args, out)
        summary = train(recipe)
        peak = peak_rss_mb()  # before the floor loads a second model
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    last_epoch_loss = [r["loss"] for r in records if "loss" in r][-1]
    return {"train_examples_per_s": summary["train_examples_per_s"],
            "real_tokens_per_s": summary["real_tokens"] / summary["train_seconds"],
            "padding": 1 - summary["real_tokens"] / summary["padded_tokens"],
            "eval_examples_per_s": summary["eval_examples_per_s"], "accuracy": summary["final"]["accuracy"],
            "last_epoch_loss": last_epoch_loss, "train_seconds": summary["train_seconds"], "steps": summary["steps"],
            "peak_rss_mb": peak, "floor_seconds_per_step": floor_seconds_per_step(recipe)}


def worker_peft(args) -> dict:
    recipe = bench_recipe(args, None)  # PEFT's side writes nothing
    run = build_peft_run(recipe, load_task_data(recipe), JOBS[args.job].methods[args.method].peft,
                         args.peft_loss == "labels")
    epochs, evaluations = [], []
    for _ in range(args.epochs):  # each epoch evaluated, as softprompt's (and PEFT's example) are
        epochs.append(peft_epoch(run))
        evaluations.append(peft_evaluation(run))
    seconds, real = sum(e["seconds"] for e in epochs), sum(e["real_tokens"] for e in epochs)
    return {"train_examples_per_s": sum(e["examples"] for e in epochs) / seconds, "real_tokens_per_s": real / seconds,
            "padding": 1 - real / sum(e["padded_tokens"] for e in epochs),
            "eval_examples_per_s": sum(e["rows"] for e in evaluations) / sum(e["seconds"] for e in evaluations),
            "accuracy": evaluations[-1]["accuracy"], "last_epoch_loss": epochs[-1]["loss"], "train_seconds": seconds,
            "steps": len(run.train_loader) * args.epochs, "peak_rss_mb": peak_rss_mb()}


SHORTCUTS = ("first_token_only", "share_leading_tokens", "read_tail_only", "pack_rows")
"""softprompt's switches for work it skips on a given batch: the last BERT layer for [CLS] alone, a decoder's
leading tokens that all rows share, run once, a decoder's last layer finishing only the columns the loss reads, and
a decoder's padding (its rows packed together behind the prefix they share)."""


def take_step(kind: str, ours: Run, theirs: PeftRun, batches: dict, shortcuts: dict[str, bool], step: int) -> None:
    """One training step of `kind` (one of STEP_KINDS). softprompt's is its own `train_step` (forward, backward,
    clipping, AdamW, schedule) without the `softprompt train` loop around it (logging, progress, memory trims)."""
    if kind.startswith("peft"):
        peft_train_step(theirs, batches["peft" if kind == "peft" else "softprompt"])
        return
    for name, on in shortcuts.items():
        off = kind == SHORTCUT_OFF or (kind == ROWS_PADDED and name == "pack_rows")
        setattr(ours.unwrapped, name, on and not off)
    train_step(ours, batches["softprompt"], step)


def seconds_per_step_kind(ours: Run, theirs: PeftRun, batch_limit: int) -> dict[str, float]:
    """One epoch (its first `batch_limit` batches, if not 0) in which each kind of step takes its turn on every
    batch, the first place rotating from batch to batch: the seconds each kind took in all, with no drift of the
    machine between them."""
    shortcuts = {name: getattr(ours.unwrapped, name) for name in SHORTCUTS}
    kinds = [kind for kind in STEP_KINDS if (kind != SHORTCUT_OFF or any(shortcuts.values()))
             and (kind != ROWS_PADDED or shortcuts["pack_rows"])]
    seconds = dict.fromkeys(kinds, 0.0)
    ours.model.train()
    theirs.model.train()
    pairs = [{"softprompt": a, "peft": b} for a, b in zip(ours.train_loader, theirs.train_loader, strict=True)]
    pairs = pairs[:batch_limit or None]
    for kind in kinds:  # untimed: a model's first step pays one-time costs (allocations, kernel choices)
        take_step(kind, ours, theirs, pairs[0], shortcuts, 0)
    for index, batches in enumerate(pairs):
        first = index % len(kinds)
        for kind in kinds[first:] + kinds[:first]:
            start = time.perf_counter()
            take_step(kind, ours, theirs, batches, shortcuts, index + 1)
            seconds[kind] += time.perf_counter() - start
    for name, on in shortcuts.items():
        setattr(ours.unwrapped, name, on)
    return seconds


def worker_one_process(args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        recipe = bench_recipe(args, out)
        ours = set_up(recipe, make_accelerator(recipe))
        theirs = build_peft_run(recipe, load_task_data(recipe), JOBS[args.job].methods[args.method].peft,
                                args.peft_loss == "labels")
        seconds = seconds_per_step_kind(ours, theirs, args.one_process_batches)
    identical = {kind: seconds[PEFT_ON_OUR_BATCH] / seconds[kind] if kind in seconds else None
                 for kind in ("softprompt", ROWS_PADDED, SHORTCUT_OFF)}
    return {"own_batches_ratio": seconds["peft"] / seconds["softprompt"],
            "identical_batches_ratio": identical["softprompt"],
            "identical_batches_ratio_rows_padded": identical[ROWS_PADDED],
            "identical_batches_ratio_shortcut_off": identical[SHORTCUT_OFF]}


def floor_step(model: torch.nn.Module, batch: dict, virtual_tokens: int, causal_lm: bool) -> None:
    """Forward + backward through the bare model with `virtual_tokens` zero embeddings put first, which need a
    gradient as a prompt does."""
    tokens = model.get_input_embeddings()(batch["input_ids"])
    rows = tokens.shape[0]
    extra = torch.zeros(rows, virtual_tokens, tokens.shape[2], requires_grad=True)
    mask = batch["attention_mask"]
    inputs = {"inputs_embeds": torch.cat([extra, tokens], 1),
              "attention_mask": torch.cat([mask.new_ones(rows, virtual_tokens), mask], 1)}
    if "token_type_ids" in batch:
        types = batch["token_type_ids"]
        inputs["token_type_ids"] = torch.cat([types.new_zeros(rows, virtual_tokens), types], 1)
    if causal_lm:  # only the label word's prediction goes through the LM head, and no KV cache, as in softprompt
        logits = model(**inputs, logits_to_keep=PREDICTS_LABEL_WORD, use_cache=False).logits[:, 0]
        targets = batch["labels"][:, -1]
    else:
        logits, targets = model(**inputs).logits, batch["labels"]
    F.cross_entropy(logits.float(), targets).backward()


def floor_seconds_per_step(recipe: Recipe) -> float:
    """Forward + backward through the bare frozen model on softprompt's batches, each lengthened by the virtual
    tokens: the least any soft-prompt method can cost."""
    torch.manual_seed(recipe.training.seed)
    tasks = load_task_data(recipe)
    model = plain_model(recipe, len(tasks[0].label_names))
    model.requires_grad_(False)
    model.train()
    batches = training_loader(recipe, tasks, plain_tokenizer(recipe))
    seconds = 0.0
    for batch in batches:  # the first epoch's batches: later epochs hold the same ones in another order
        start = time.perf_counter()
        floor_step(model, batch, recipe.method.num_virtual_tokens, recipe.task.type == "causal_lm")
        seconds += time.perf_counter() - start
    return seconds / len(batches)


WORKERS = {"softprompt": worker_softprompt, "peft": worker_peft, "one_process": worker_one_process}


class WorkerFailed(Exception):
    """One worker ended without a result; its cells say "failed" and the bench goes on."""


def run_worker(kind: str, method: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--method", method, "--job", args.job,
               "--epochs", str(args.epochs), "--max-train-samples", str(args.max_train_samples),
               "--max-eval-samples", str(args.max_eval_samples), "--seed", str(args.seed),
               "--glue-dir", str(args.glue_dir), "--weight-decay", str(args.weight_decay),
               "--max-grad-norm", str(args.max_grad_norm), "--one-process-batches", str(args.one_process_batches),
               "--peft-loss", args.peft_loss, "--group-by-length", args.group_by_length]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{method}: {kind} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        raise WorkerFailed(f"{method}, {kind}: {last[:200]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


@dataclass
class MethodRuns:
    """What one method's workers returned; a failed worker left a reason instead."""

    softprompt: list[dict] = field(default_factory=list)
    peft: list[dict] = field(default_factory=list)
    sides_tried: set[str] = field(default_factory=set)
    """The sides that had separate runs (none with --repeats 0)."""
    one_process: dict | None = None
    one_process_tried: bool = False
    failures: list[str] = field(default_factory=list)


def measure_method(method: str, args) -> MethodRuns:
    """Alternating separate runs of both tools (a side that failed once is not run again), then both in one
    process where both sides ran."""
    runs, failed = MethodRuns(), set()
    for repeat in range(args.repeats):
        for kind in ("softprompt", "peft") if repeat % 2 == 0 else ("peft", "softprompt"):
            if kind in failed:
                continue
            print(f"{method}: {kind} (repeat {repeat + 1})", file=sys.stderr, flush=True)
            runs.sides_tried.add(kind)
            try:
                getattr(runs, kind).append(run_worker(kind, method, args))
            except WorkerFailed as err:
                failed.add(kind)
                runs.failures.append(str(err))
    if (runs.softprompt and runs.peft) or not args.repeats:
        print(f"{method}: both in one process", file=sys.stderr, flush=True)
        runs.one_process_tried = True
        try:
            runs.one_process = run_worker("one_process", method, args)
        except WorkerFailed as err:
            runs.failures.append(str(err))
    return runs


def median(runs: list[dict], key: str) -> float | None:
    return statistics.median(r[key] for r in runs) if runs else None


def both(runs: MethodRuns, key: str, form: str, scale: float = 1.0, unit: str = "") -> str:
    """softprompt's and PEFT's medians of `key`: "failed" for a side whose runs failed, "-" for one not run."""
    cells = []
    for side in ("softprompt", "peft"):
        value = median(getattr(runs, side), key)
        missing = "failed" if side in runs.sides_tried else "-"
        cells.append(missing if value is None else format(scale * value, form) + unit)
    return " / ".join(cells)


def one_process_cells(runs: MethodRuns) -> list[str]:
    if runs.one_process is None:
        missing = "failed" if runs.one_process_tried else "-"
        return [missing, missing]
    result = runs.one_process
    padded, off = (result.get(f"identical_batches_ratio_{kind}") for kind in ("rows_padded", "shortcut_off"))
    identical = f"{result['identical_batches_ratio']:.2f}x" + ("" if padded is None else f", padded {padded:.2f}x")
    return [f"{result['own_batches_ratio']:.2f}x", identical + ("" if off is None else f" ({off:.2f}x)")]


def floor_cell(runs: MethodRuns) -> str:
    ours = runs.softprompt
    if not ours:
        return "failed" if "softprompt" in runs.sides_tried else "-"
    step, floor = median(ours, "train_seconds") / median(ours, "steps"), median(ours, "floor_seconds_per_step")
    return f"{1000 * step:.0f} ms vs {1000 * floor:.0f} ms ({100 * (step / floor - 1):+.0f}%)"


HEADER = ["method", "train ex/s", "ratio", "ratio, one process",
          "ratio, identical batches[, rows padded] (shortcuts off)",
          "real tokens/s", "padding", "peak RSS", "eval ex/s", "dev acc", "train loss, last epoch",
          "step time vs bare-model floor"]


def method_row(method: str, runs: MethodRuns) -> list[str]:
    ratios = [a["train_examples_per_s"] / b["train_examples_per_s"] for a, b in zip(runs.softprompt, runs.peft)]
    ratio = f"**{statistics.median(ratios):.2f}x**" if ratios else "-"
    return [method, both(runs, "train_examples_per_s", ".1f"), ratio,
            *one_process_cells(runs), both(runs, "real_tokens_per_s", ".0f"), both(runs, "padding", ".0%"),
            both(runs, "peak_rss_mb", ".2f", 1 / 1024, " GB"), both(runs, "eval_examples_per_s", ".0f"),
            both(runs, "accuracy", ".1f", 100), both(runs, "last_epoch_loss", ".3f"), floor_cell(runs)]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=list(JOBS), default="minilm-mrpc")
    parser.add_argument("--methods", default="prompt_tuning,p_tuning,prefix_tuning")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-train-samples", type=int, help="0: all; default: 800 (MRPC), 2,000 (SST-2)")
    parser.add_argument("--max-eval-samples", type=int, default=0, help="0: the whole dev set")
    parser.add_argument("--repeats", type=int, default=2,
                        help="A B pairs per method (B A in every other pair); 0: the one-process ratios alone")
    parser.add_argument("--one-process-batches", type=int, default=0,
                        help="batches the one-process ratios are timed on; 0: the whole first epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, for both tools")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping for both tools; 0: none")
    parser.add_argument("--peft-loss", choices=["label-word", "labels"], default="label-word",
                        help="causal LM: PEFT's loss from the label word's logits alone (as softprompt), or from "
                             "`labels` passed to the model (PEFT's examples: logits at every position)")
    parser.add_argument("--group-by-length", choices=["on", "off"],
                        help="softprompt's training.group_by_length (off: shuffled batches, as PEFT's); default: "
                             "as auto sets it on a CPU (MiniLM: on, SmolLM2: off)")
    parser.add_argument("--glue-dir", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_train_samples is None:
        args.max_train_samples = JOBS[args.job].default_rows
    args.group_by_length = args.group_by_length or JOBS[args.job].group_by_length
    return args


def main() -> None:
    args = parse_arguments()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print("RESULT " + json.dumps(WORKERS[args.worker](args)))
        return
    span = f"the first {args.one_process_batches} batch(es) of one" if args.one_process_batches else "one"
    print(f"{JOBS[args.job].title} ({training_rows(args)} training rows, {args.epochs} epoch(s)), {args.threads} "
          f"threads, median of {args.repeats} alternating run(s); weight decay {args.weight_decay}, gradient "
          f"clipping at {args.max_grad_norm or 'none'}; softprompt's batches grouped by length: "
          f"{args.group_by_length}; softprompt / PEFT. One process: both tools' steps in turn, "
          f"batch by batch, through {span} epoch; identical batches: PEFT on softprompt's batches:\n")
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    failures = []
    for method in args.methods.split(","):
        runs = measure_method(method, args)
        failures += runs.failures
        print("| " + " | ".join(method_row(method, runs)) + " |", flush=True)
    if failures:
        print("\nfailed: " + "\n        ".join(failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
