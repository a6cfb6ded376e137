"""softprompt against Hugging Face PEFT on the same job, measured side by side in one invocation.

    python scripts/bench_vs_peft.py                       # default: ~15 minutes on a 2-core CPU
    python scripts/bench_vs_peft.py --epochs 5 --max-train-samples 0 --repeats 1   # the full MRPC job

Job: the packaged MiniLM (sentence-transformers/all-MiniLM-L6-v2) on GLUE MRPC from ../shared/data/glue,
each method with PEFT's example hyperparameters (batch 16, AdamW, linear warmup 6%, max length 128,
the model's own classification head). PEFT runs the loop of its example
examples/sequence_classification/peft_no_lora_accelerate.py (shuffled batches padded to their
longest row); softprompt runs `softprompt train` with its defaults (batches of similar lengths).
Every run is a fresh process with the same number of threads; runs alternate A B B A so that drift of
the machine hits both. Right after training, each softprompt process measures the floor: forward +
backward through the bare frozen model on the same batches, lengthened by the virtual tokens, with no
prompt machinery at all (in the same process, so that the two step times are a fair pair). Last, one
process per method runs both tools' training steps alternating batch by batch: a throughput ratio that
no drift of the machine between runs can touch. Besides dev accuracy, both report their mean training loss
over the last epoch: a short budget can leave both at the majority class, and the loss still shows whether
they learn alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULTS = {  # PEFT's examples: method -> (virtual tokens, learning rate, extra PEFT / softprompt options)
    "prompt_tuning": (10, 1e-2, {}),
    "p_tuning": (20, 1e-2, {"encoder_hidden_size": 128}),
    "prefix_tuning": (20, 1e-2, {}),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mrpc(glue_dir: Path, split: str, limit: int | None):
    from softprompt_cli.data.sources import read_table

    rows = read_table(glue_dir / "MRPC" / ("train.tsv" if split == "train" else "dev.tsv"), "tsv")
    rows = rows[:limit] if limit else rows
    return [(r["#1 String"], r["#2 String"]) for r in rows], [int(r["Quality"]) for r in rows]


def model_path() -> str:
    from softprompt_cli.hub import packaged_model_path

    return packaged_model_path(MODEL)


def softprompt_recipe(args, out: str):
    from softprompt_cli.config.load import parse_recipe

    n, lr, extra = DEFAULTS[args.method]
    steps_per_epoch = math.ceil((args.max_train_samples or 3668) / 16)
    return parse_recipe({
        "model": {"name_or_path": MODEL},
        "data": {"glue_task": "mrpc", "dir": str(args.glue_dir), "max_train_samples": args.max_train_samples or None},
        "method": {"name": args.method, "num_virtual_tokens": n, **extra},
        "training": {"lr": lr, "batch_size": 16, "eval_batch_size": 64, "epochs": args.epochs, "seed": args.seed,
                     "log_steps": steps_per_epoch},  # one log record per epoch: its mean training loss
        "output": {"dir": out},
    })


def softprompt_batches(recipe, tokenizer):
    """The training batches `softprompt train` makes for this recipe (epoch 0), and the label names."""
    from softprompt_cli.data.batching import training_loader
    from softprompt_cli.data.tasks import load_task_data

    tasks = load_task_data(recipe)
    return training_loader(recipe, tasks, tokenizer), tasks[0].label_names


def worker_softprompt(args) -> dict:
    from softprompt_cli.training.loop import train

    with tempfile.TemporaryDirectory() as out:
        summary = train(softprompt_recipe(args, out))
        peak = peak_rss_mb()  # before the floor loads a second model
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    last_epoch_loss = [r["loss"] for r in records if "loss" in r][-1]
    return {"train_examples_per_s": summary["train_examples_per_s"],
            "real_tokens_per_s": summary["real_tokens"] / summary["train_seconds"],
            "padding": 1 - summary["real_tokens"] / summary["padded_tokens"],
            "eval_examples_per_s": summary["eval_examples_per_s"], "accuracy": summary["final"]["accuracy"],
            "last_epoch_loss": last_epoch_loss, "train_seconds": summary["train_seconds"], "steps": summary["steps"],
            "peak_rss_mb": peak,
            "floor_seconds_per_step": floor_seconds_per_step(args)}


def peft_job(args):
    """PEFT's model, optimizer, schedule and loaders, as in its example."""
    import peft
    import torch
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    from softprompt_cli.peft_compat import expose_past_key_values

    torch.manual_seed(args.seed)
    n, lr, extra = DEFAULTS[args.method]
    config = {"prompt_tuning": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n),
              "p_tuning": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=n, **extra),
              "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n),
              }[args.method]()
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    # PEFT <= 0.21.2 looks for `past_key_values` in BERT's forward, which transformers 5 calls `cache`.
    model = peft.get_peft_model(expose_past_key_values(base), config)

    def encode(split, limit):
        texts, labels = mrpc(args.glue_dir, split, limit)
        return [{**tokenizer(a, b, truncation=True, max_length=128), "labels": y} for (a, b), y in zip(texts, labels)]

    train_rows, dev_rows = encode("train", args.max_train_samples or None), encode("dev", None)
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = DataLoader(train_rows, shuffle=True, batch_size=16, collate_fn=collate)
    dev_loader = DataLoader(dev_rows, batch_size=64, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    total = len(train_loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * total), total)
    return model, optimizer, scheduler, train_loader, dev_loader, len(dev_rows)


def worker_peft(args) -> dict:
    import torch

    model, optimizer, scheduler, train_loader, dev_loader, dev_size = peft_job(args)
    real = padded = examples = 0
    train_seconds = eval_seconds = 0.0
    for _ in range(args.epochs):
        model.train()
        start = time.perf_counter()
        epoch_losses = []
        for batch in train_loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            examples += len(batch["labels"])
            epoch_losses.append(loss.item())
        train_seconds += time.perf_counter() - start
        model.eval()
        start = time.perf_counter()
        correct = 0
        with torch.no_grad():
            for batch in dev_loader:
                correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        eval_seconds += time.perf_counter() - start
    return {"train_examples_per_s": examples / train_seconds, "real_tokens_per_s": real / train_seconds,
            "padding": 1 - real / padded, "eval_examples_per_s": dev_size * args.epochs / eval_seconds,
            "accuracy": correct / dev_size, "last_epoch_loss": statistics.mean(epoch_losses),
            "train_seconds": train_seconds, "steps": len(train_loader) * args.epochs,
            "peak_rss_mb": peak_rss_mb()}


def worker_interleaved(args) -> dict:
    """Both tools' training steps in one process, alternating batch by batch through one epoch (each on its
    own batches), so that no drift of the machine falls between them. softprompt's side is its model,
    loader and AdamW step without the `softprompt train` loop around them (logging, progress, memory trims)."""
    import torch

    from softprompt_cli.assemble import build_model
    from softprompt_cli.model.loading import load_tokenizer

    with tempfile.TemporaryDirectory() as out:
        recipe = softprompt_recipe(args, out)
    our_batches, label_names = softprompt_batches(recipe, load_tokenizer(MODEL))
    ours, _ = build_model(recipe, label_names)
    our_optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=DEFAULTS[args.method][1])
    theirs, their_optimizer, their_scheduler, their_batches, _, _ = peft_job(args)
    ours.train()
    theirs.train()

    def our_step(batch):
        ours(**batch)["loss"].backward()
        our_optimizer.step()
        our_optimizer.zero_grad()

    def their_step(batch):
        theirs(**batch).loss.backward()
        their_optimizer.step()
        their_scheduler.step()
        their_optimizer.zero_grad()

    seconds = {our_step: 0.0, their_step: 0.0}
    for i, (our_batch, their_batch) in enumerate(zip(our_batches, their_batches, strict=True)):
        pairs = [(our_step, our_batch), (their_step, their_batch)]
        for step, batch in pairs if i % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            step(batch)
            seconds[step] += time.perf_counter() - start
    return {"interleaved_ratio": seconds[their_step] / seconds[our_step]}


def floor_seconds_per_step(args) -> float:
    """Forward + backward through the bare frozen model on softprompt's batches, each lengthened by the
    virtual tokens: the least any soft-prompt method can cost."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from softprompt_cli.model.loading import load_tokenizer

    torch.manual_seed(args.seed)
    n = DEFAULTS[args.method][0]
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    model.requires_grad_(False)
    model.train()
    with tempfile.TemporaryDirectory() as out:
        batches, _ = softprompt_batches(softprompt_recipe(args, out), load_tokenizer(MODEL))
    embed = model.get_input_embeddings()
    seconds = 0.0
    for batch in batches:  # the first epoch's batches: later epochs hold the same ones in another order
        start = time.perf_counter()
        tokens = embed(batch["input_ids"])
        extra = torch.zeros(tokens.shape[0], n, tokens.shape[2], requires_grad=True)
        mask = torch.cat([batch["attention_mask"].new_ones(tokens.shape[0], n), batch["attention_mask"]], 1)
        types = torch.cat([batch["token_type_ids"].new_zeros(tokens.shape[0], n), batch["token_type_ids"]], 1)
        logits = model(inputs_embeds=torch.cat([extra, tokens], 1), attention_mask=mask, token_type_ids=types).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        seconds += time.perf_counter() - start
    return seconds / len(batches)


class WorkerFailed(Exception):
    """One side of a method's runs ended without a result; the table reports it and goes on."""


def run_worker(kind: str, method: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--method", method, "--epochs", str(args.epochs),
               "--max-train-samples", str(args.max_train_samples), "--seed", str(args.seed),
               "--glue-dir", str(args.glue_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{kind} {method} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        raise WorkerFailed(f"{kind} failed: {last[:160]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


HEADER = ["method", "train ex/s", "ratio", "ratio, one process", "real tokens/s", "padding", "peak RSS", "eval ex/s",
          "dev acc", "train loss, last epoch", "step time vs bare-model floor"]


def method_row(method: str, args) -> list[str]:
    """One table row: alternating separate runs of both tools, then both in one process."""
    ours, theirs = [], []
    for repeat in range(args.repeats):
        order = ("softprompt", "peft") if repeat % 2 == 0 else ("peft", "softprompt")
        for kind in order:
            print(f"{method}: {kind} (repeat {repeat + 1})", file=sys.stderr, flush=True)
            (ours if kind == "softprompt" else theirs).append(run_worker(kind, method, args))
    print(f"{method}: both in one process", file=sys.stderr, flush=True)
    interleaved = run_worker("interleaved", method, args)["interleaved_ratio"]
    ratio = statistics.median(a["train_examples_per_s"] / b["train_examples_per_s"] for a, b in zip(ours, theirs))

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    step = median(ours, "train_seconds") / median(ours, "steps")
    floor = median(ours, "floor_seconds_per_step")
    return [method, f"{median(ours, 'train_examples_per_s'):.1f} / {median(theirs, 'train_examples_per_s'):.1f}",
            f"**{ratio:.2f}x**", f"{interleaved:.2f}x",
            f"{median(ours, 'real_tokens_per_s'):.0f} / {median(theirs, 'real_tokens_per_s'):.0f}",
            f"{100 * median(ours, 'padding'):.0f}% / {100 * median(theirs, 'padding'):.0f}%",
            f"{median(ours, 'peak_rss_mb') / 1024:.2f} / {median(theirs, 'peak_rss_mb') / 1024:.2f} GB",
            f"{median(ours, 'eval_examples_per_s'):.0f} / {median(theirs, 'eval_examples_per_s'):.0f}",
            f"{100 * median(ours, 'accuracy'):.1f} / {100 * median(theirs, 'accuracy'):.1f}",
            f"{median(ours, 'last_epoch_loss'):.3f} / {median(theirs, 'last_epoch_loss'):.3f}",
            f"{1000 * step:.0f} ms vs {1000 * floor:.0f} ms ({100 * (step / floor - 1):+.0f}%)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="prompt_tuning,p_tuning,prefix_tuning")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-train-samples", type=int, default=800, help="0: all 3,668")
    parser.add_argument("--repeats", type=int, default=2, help="A B pairs per method (B A in every other pair)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--glue-dir", type=Path, default=Path("../shared/data/glue"))
    parser.add_argument("--worker", choices=["softprompt", "peft", "interleaved"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        workers = {"softprompt": worker_softprompt, "peft": worker_peft, "interleaved": worker_interleaved}
        result = workers[args.worker](args)
        print("RESULT " + json.dumps(result))
        return

    # Each row is printed as soon as its method is done, so that a later failure loses nothing.
    print(f"MiniLM-L6 on MRPC ({args.max_train_samples or 3668} training rows, {args.epochs} epoch(s)), "
          f"{args.threads} threads, median of {args.repeats} alternating run(s); softprompt / PEFT. "
          "'ratio, one process': both tools' steps alternating batch by batch in one process, one epoch:\n")
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    failed = False
    for method in args.methods.split(","):
        try:
            row = method_row(method, args)
        except WorkerFailed as err:
            failed = True
            row = [method, f"failed ({err})"] + [""] * (len(HEADER) - 2)
        print("| " + " | ".join(row) + " |", flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
