"""Training step time of a decoder with what every row shares computed once per step, against every row computing
it, on the same batches: the virtual tokens of an input prompt (given to every row as keys and values), or the
leading tokens that every row of a batch has alike (a template's start, run once after the prompt). With
--packing: the rows packed without padding behind that prefix, against padded rows.

    python scripts/bench_computed_once.py recipes/sst2_smollm2_prompt_tuning.yaml [key=value ...] \
        [--steps 12] [--virtual-tokens 10 20 50]
    python scripts/bench_computed_once.py recipes/sst2_smollm2_prompt_tuning.yaml --steps 12 \
        --templates "Review: {sentence}\nSentiment:" "Classify the review as positive or negative.\n{sentence}\n..."
    python scripts/bench_computed_once.py recipes/sst2_smollm2_prompt_tuning.yaml method.name=prefix_tuning \
        training.group_by_length=false --steps 8 --packing
    python scripts/bench_computed_once.py recipes/mpt_source_smollm2.yaml --virtual-tokens 10   # each task's once

Each step: forward, backward and AdamW step, the two ways alternating batch by batch (so that machine drift falls
on both), after one warm-up step each. Prints the median step time of each and their ratio, one row per prompt
length or template as soon as it is measured, and how far apart the two ways' loss and gradients are on the first
batch (the largest difference, over the largest value). Not a test: it trains a real model for minutes.
--any-device: run once (and pack) on this device as on a CPU; GPUs otherwise keep every row whole, so that both
columns there are the same computation. The recipe's training.mixed_precision applies (as autocast).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def virtual_tokens_once(model, on: bool) -> None:
    model.virtual_tokens_as_prefix = on
    model.kind = "prefix" if on else "input"


def leading_tokens_once(model, on: bool) -> None:
    model.share_leading_tokens = on


def rows_packed(model, on: bool) -> None:
    model.pack_rows = on


def step_seconds(model, optimizer, batch: dict) -> float:
    import torch

    started = time.perf_counter()
    model(**batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad()
    if batch["input_ids"].is_cuda:  # the step is queued on the GPU, not done
        torch.cuda.synchronize()
    return time.perf_counter() - started


def loss_and_gradients(model, batch: dict) -> tuple[float, list]:
    model.zero_grad()
    loss = model(**batch)["loss"]
    loss.backward()
    gradients = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad()
    return loss.item(), gradients


def disagreement(model, batch: dict, switch: Callable) -> str:
    """How far the two ways' loss and gradients are apart on `batch`, each relative to its largest value (without
    dropout, whose masks the two ways would draw differently)."""
    model.eval()
    results = {}
    for on in (True, False):
        switch(model, on)
        results[on] = loss_and_gradients(model, batch)
    model.train()
    (loss_on, grads_on), (loss_off, grads_off) = results[True], results[False]
    largest = max(float(g.abs().max()) for g in grads_off)
    gap = max(float((a - b).abs().max()) for a, b in zip(grads_on, grads_off))
    return f"loss {abs(loss_on - loss_off) / abs(loss_off):.1e}, gradients {gap / largest:.1e}"


def measure(model, lr: float, batches: list[dict], switch: Callable) -> dict[bool, list[float]]:
    """Step times with `switch` on and off, alternating on each batch (the first batch warms both up)."""
    import torch

    model.to(batches[0]["input_ids"].device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    times: dict[bool, list] = {True: [], False: [], "apart": disagreement(model, batches[0], switch)}
    for index, batch in enumerate([batches[0]] + batches):
        for on in (True, False) if index % 2 else (False, True):
            switch(model, on)
            seconds = step_seconds(model, optimizer, batch)
            if index:
                times[on].append(seconds)
    switch(model, True)
    return times


def recipe_batches(recipe, tasks, tokenizer, steps: int, device: str) -> list[dict]:
    from softprompt_cli.data.batching import training_loader

    batches = [batch for _, batch in zip(range(steps), training_loader(recipe, tasks, tokenizer))]
    return [{k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask", "labels", "task_ids")}
            for b in batches]


def labels_of(recipe, tasks) -> list[str] | dict[str, list[str]]:
    """The label names, or each task's for a multi-task recipe (each task's prompt, several in a batch)."""
    return {task.name: task.label_names for task in tasks} if recipe.is_multitask else tasks[0].label_names


def shared_leading_tokens(model, batches: list[dict]) -> float:
    """The mean number of leading tokens the rows of a batch share (the last column is not run in training)."""
    from softprompt_cli.model import computed_once as leading_tokens

    counts = []
    for batch in batches:
        mask = batch["attention_mask"][:, :-1]
        counts.append(leading_tokens.shared_leading_count(batch["input_ids"][:, :-1], mask,
                                                          leading_tokens.first_real_column(mask)))
    return statistics.mean(counts)


def row(label: str, times: dict) -> str:
    each, once = statistics.median(times[False]), statistics.median(times[True])
    return f"| {label} | {1000 * each:.0f} ms | {1000 * once:.0f} ms | {each / once:.2f}x | {times['apart']} |"


def compare_virtual_tokens(recipe, tasks, base, tokenizer, batches: list[dict], counts: list[int]) -> None:
    from softprompt_cli.assemble import build_model

    print("| virtual tokens | in every row | computed once | speed-up | apart |\n|---|---|---|---|---|")
    for n in counts:
        recipe.method.num_virtual_tokens = n
        model, _ = build_model(recipe, labels_of(recipe, tasks), base=base, tokenizer=tokenizer)
        if not model.virtual_tokens_as_prefix:
            raise SystemExit(f"{recipe.model.name_or_path} with {recipe.method.name} keeps its virtual tokens in "
                             "the input (an encoder, a prefix method or a sliding window): nothing to compare.")
        model.share_leading_tokens = model.pack_rows = False  # each measured on its own
        print(row(str(n), measure(model, recipe.training.lr, batches, virtual_tokens_once)), flush=True)


def compare_templates(recipe, base, tokenizer, steps: int, templates: list[str], device: str) -> None:
    from softprompt_cli.assemble import build_model
    from softprompt_cli.data.tasks import load_task_data

    print("| template | shared leading tokens | every row runs them | run once | speed-up | apart |\n"
          "|---|---|---|---|---|---|")
    for template in templates:
        recipe.task.template = template.replace("\\n", "\n")
        tasks = load_task_data(recipe)  # the template is filled in as the rows are read
        batches = recipe_batches(recipe, tasks, tokenizer, steps, device)
        model, _ = build_model(recipe, labels_of(recipe, tasks), base=base, tokenizer=tokenizer)
        model.pack_rows = False  # measured on its own (--packing)
        shared = shared_leading_tokens(model, batches)
        label = f"`{template}` | {shared:.1f}"
        print(row(label, measure(model, recipe.training.lr, batches, leading_tokens_once)), flush=True)


def compare_packing(recipe, tasks, base, tokenizer, batches: list[dict]) -> None:
    from softprompt_cli.assemble import build_model

    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padding = 1 - real / sum(b["attention_mask"].numel() for b in batches)
    print("| batches | padding | padded | packed | speed-up | apart |\n|---|---|---|---|---|---|")
    model, _ = build_model(recipe, labels_of(recipe, tasks), base=base, tokenizer=tokenizer)
    grouping = "grouped by length" if recipe.training.group_by_length else "shuffled"
    print(row(f"{grouping} | {padding:.0%}", measure(model, recipe.training.lr, batches, rows_packed)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--virtual-tokens", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--templates", nargs="+", help="compare leading tokens run once, for each template")
    parser.add_argument("--packing", action="store_true", help="compare rows packed without padding with padded rows")
    parser.add_argument("--device", help="default: cuda where there is one, else cpu")
    parser.add_argument("--any-device", action="store_true", help="run once and pack on this device as on a CPU")
    args = parser.parse_args()

    import torch

    from softprompt_cli import precision
    from softprompt_cli.assemble import load_frozen
    from softprompt_cli.config.load import load_recipe
    from softprompt_cli.data.tasks import load_task_data

    recipe = load_recipe(args.recipe, args.overrides)
    tasks = load_task_data(recipe)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.any_device:
        from softprompt_cli.model import computed_once, packing

        computed_once.ONCE_DEVICE_TYPES.add(torch.device(device).type)
        packing.PACKING_MIN_SAVED_SHARE[torch.device(device).type] = packing.PACKING_MIN_SAVED_SHARE["cpu"]
        packing.SEVERAL_PROMPTS_PACKING_DEVICE_TYPES.add(torch.device(device).type)
    base, tokenizer = load_frozen(recipe, tasks[0].label_names)
    batches = recipe_batches(recipe, tasks, tokenizer, args.steps, device)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    ran = precision.resolve(recipe.training.mixed_precision, torch.device(device))
    print(f"{recipe.model.name_or_path}, {recipe.method.name}, {len(batches)} batches of "
          f"{recipe.training.batch_size} ({tokens / len(batches) / recipe.training.batch_size:.1f} real tokens a row "
          f"with the recipe's template), {device}, {precision.display_name(ran)}, {torch.get_num_threads()} threads; "
          "median step time (forward, backward, AdamW):")
    with precision.autocast(ran, torch.device(device).type):
        if args.packing:
            compare_packing(recipe, tasks, base, tokenizer, batches)
        elif args.templates:
            compare_templates(recipe, base, tokenizer, args.steps, args.templates, device)
        else:
            compare_virtual_tokens(recipe, tasks, base, tokenizer, batches, args.virtual_tokens)

if __name__ == "__main__":
    from softprompt_cli.errors import UserError

    try:
        main()
    except UserError as err:  # a wrong recipe path or key: the message, as the CLI gives it
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
