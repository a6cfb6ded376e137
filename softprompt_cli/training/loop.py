"""The training loop: recipe -> data + frozen model + soft prompt -> Accelerate loop -> checkpoints.

`train` sets up a `Run` (everything fixed for the run) and a `Progress` (everything that moves and is
saved for resuming), then `fit` steps through the batches; every function gets what it uses as
arguments.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as ProgressBar

from softprompt_cli import memory, precision
from softprompt_cli.artifacts.checkpoint import (
    RECIPE_FILE,
    output_lock,
    recover_folder,
    refuse_earlier_output,
    write_checkpoint,
    write_small_file,
)
from softprompt_cli.assemble import build_model
from softprompt_cli.config.schema import DataSection, Recipe
from softprompt_cli.data.batching import evaluation_loader, task_rows, training_loader
from softprompt_cli.data.sources import glue_dir
from softprompt_cli.data.tasks import all_targets, load_task_data, task_labels
from softprompt_cli.errors import UserError
from softprompt_cli.model.loading import config_fingerprint
from softprompt_cli.model.soft_prompt import PROMPT_PREFIX, SoftPromptModel
from softprompt_cli.training.control import (
    StopRequest,
    TrainingStopped,
    all_processes_agree,
    finish,
    fresh_accelerator,
    stop_everywhere,
)
from softprompt_cli.training.distill import Teacher, load_teachers, teacher_outputs
from softprompt_cli.training.evaluate import evaluate
from softprompt_cli.training.metrics_log import MetricsLog
from softprompt_cli.training.resume import (
    capture_rng,
    check_resumable,
    load_state,
    restore_rng,
    save_state,
    with_group_by_length,
    with_saved_batching,
)

console = Console(soft_wrap=True)  # logs stay one line per event when piped
RUN_FILES = ("best", "final", "metrics.jsonl", "state")


def warmup_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate's factor at `step`: 1) linear from 0 to 1 over `warmup` steps, 2) linear down to 0 at
    `total` (transformers' linear schedule; its import pulls in the Trainer's dependencies, SciPy and PEFT)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def linear_warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int,
                           total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup, total))


@dataclass
class Progress:
    """Where the run stands: what a resumed run continues from."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    """Batches of the current epoch already trained on (with gradient accumulation, more than steps)."""
    best: dict[str, Any] = field(default_factory=lambda: {"value": -math.inf})
    window_loss: float = 0.0
    window_batches: int = 0
    """Loss summed over the batches since the last log line, and their count."""


@dataclass
class Counters:
    """Throughput bookkeeping for the summary and the log lines (not saved on resume)."""

    started: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    window_examples: int = 0
    eval_seconds: float = 0.0
    evaluations: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    train_examples: int = 0


@dataclass
class Run:
    """What stays fixed during a run."""

    recipe: Recipe
    out: Path
    accelerator: Accelerator
    model: Any
    """The prepared (possibly DDP-wrapped) model; `unwrapped` is the SoftPromptModel."""
    unwrapped: SoftPromptModel
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    eval_targets: list[str] | None
    """Free-form causal_lm: every task's evaluation targets (rows point into it)."""
    labels: list[str] | dict[str, list[str]]
    """The label names, or each task's (multi-task)."""
    teachers: dict[int, Teacher]
    """Distillation: each task's teacher, by task index."""
    steps_per_epoch: int
    total_steps: int
    trainable: int
    fingerprint: str

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's Accelerator, in the recipe's mixed precision; `auto`: bf16 where its device computes bf16
    natively, else no (`accelerator.mixed_precision` says which). Accelerate picks the device as it starts, so
    auto starts a float32 one first and replaces it where bf16 pays."""
    setting = recipe.training.mixed_precision
    if setting != "auto":
        return _accelerator(recipe, setting)
    float32 = _accelerator(recipe, "no")
    chosen = precision.resolve(setting, float32.device)
    return float32 if chosen == "no" else _accelerator(recipe, chosen)


def _accelerator(recipe: Recipe, mixed_precision: str) -> Accelerator:
    cfg = recipe.training
    return fresh_accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=recipe.output.dir,
    )


def with_precision(recipe: Recipe, mixed_precision: str) -> Recipe:
    return recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"mixed_precision": mixed_precision})})


def _glue_dir_pinned(data: DataSection) -> DataSection:
    folder = glue_dir(data) if data.glue_task and data.dir is None else None
    return data if folder is None else data.model_copy(update={"dir": str(folder.resolve())})


def with_glue_dir(recipe: Recipe) -> Recipe:
    """GLUE data read through $GLUE_DIR recorded as data.dir, so that what the run's checkpoints read (the tsv's
    text and label columns, not the Hub's; eval's data) does not depend on the environment they are used in."""
    if recipe.tasks is None:
        return recipe.model_copy(update={"data": _glue_dir_pinned(recipe.data)})
    return recipe.model_copy(update={"tasks": [task.model_copy(update={"data": _glue_dir_pinned(task.data)})
                                               for task in recipe.tasks]})


def claim_output(recipe: Recipe, accelerator: Accelerator, resume: Path | None) -> dict | None:
    """The saved state to resume from (checked against the recipe), or None for a new run; the main process
    refuses a folder that holds another run and writes the resolved recipe."""
    out = Path(recipe.output.dir)
    saved = None
    if resume is not None:
        if accelerator.is_main_process:
            recover_folder(resume)  # one process repairs a replacement a crash interrupted; then all read
        accelerator.wait_for_everyone()
        saved = load_state(resume, recover=False)
        check_resumable(saved["progress"]["recipe"], recipe, resume)
    if accelerator.is_main_process:
        for name in ("best", "final"):  # finish replacements a crash interrupted, as for the state above
            recover_folder(out / name)
        if saved is None:
            refuse_earlier_output(out, recipe.output.overwrite, "Choose another output.dir, set "
                                  "output.overwrite=true to replace it, or continue it with --resume.", RUN_FILES)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        write_small_file(out / RECIPE_FILE, recipe.to_yaml())
    return saved


def make_optimizer(model: SoftPromptModel, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with the prompt at `lr` and the head at `head_lr`."""
    cfg = recipe.training
    trained = [(n, p) for n, p in model.named_parameters() if model.is_trained(n)]
    prompt_params = [p for n, p in trained if n.startswith(PROMPT_PREFIX)]
    head_params = [p for n, p in trained if not n.startswith(PROMPT_PREFIX)]
    return torch.optim.AdamW(
        [{"params": prompt_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}],
        weight_decay=cfg.weight_decay,
    )


def with_batching_decided(recipe: Recipe, model: SoftPromptModel, device: torch.device, lengths: list[int]
                          ) -> Recipe:
    """training.group_by_length: auto decided for this model, device and training rows (their `lengths`): shuffled
    batches where their rows run packed (grouping would save no padding, and costs accuracy), grouped elsewhere. The
    run keeps the decision in its recipe, which its saved state holds."""
    cfg = recipe.training
    if cfg.group_by_length != "auto":
        return recipe
    return with_group_by_length(recipe, not model.packs_training_rows(device, cfg.batch_size, lengths))


def set_up(recipe: Recipe, accelerator: Accelerator) -> Run:
    """Data, model, optimizer, schedule and loaders, prepared for the processes (seeded before this)."""
    cfg = recipe.training
    tasks = load_task_data(recipe)
    labels = task_labels(tasks) if recipe.is_multitask else tasks[0].label_names
    model, tokenizer = build_model(recipe, labels)
    teachers = load_teachers(recipe, model, tokenizer, task_labels(tasks))
    rows = task_rows(recipe, tasks, tokenizer, training=True)
    recipe = with_batching_decided(recipe, model, accelerator.device, rows["length"])
    train_loader = training_loader(recipe, tasks, tokenizer, rows)
    eval_loader = evaluation_loader(recipe, tasks, tokenizer)
    optimizer = make_optimizer(model, recipe)
    prepared, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    # The prepared scheduler steps once per process per optimizer step, hence the scaling.
    scheduler = accelerator.prepare(linear_warmup_schedule(
        optimizer, warmup * accelerator.num_processes, total_steps * accelerator.num_processes))
    if cfg.tensorboard:
        accelerator.init_trackers("tensorboard", config={"lr": cfg.lr, "batch_size": cfg.batch_size})
    unwrapped = accelerator.unwrap_model(prepared)
    return Run(recipe, Path(recipe.output.dir), accelerator, prepared, unwrapped, tokenizer, optimizer, scheduler,
               train_loader, eval_loader, all_targets(tasks), labels, teachers, steps_per_epoch, total_steps,
               sum(p.numel() for p in unwrapped.trainable_state().values()), config_fingerprint(unwrapped.base.config))


def restore(run: Run, saved: dict) -> Progress:
    """Put a stopped run's parameters, optimizer, schedule and random state back; return its progress."""
    run.unwrapped.load_trainable_state(saved["params"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    state = saved["progress"]
    restore_rng(saved["rng"][min(run.accelerator.process_index, len(saved["rng"]) - 1)])
    window_loss, window_batches = state["log_window"]
    return Progress(state["step"], state["epoch"], state["batches_done"],
                    state["best"] | {"value": state["best"].get("value", -math.inf)}, window_loss, window_batches)


def save_checkpoint(run: Run, name: str, progress: Progress, results: dict) -> int:
    """Write best/ or final/ (main process); return the weights file's size in bytes."""
    recipe = run.recipe
    info = {
        "method": recipe.method.model_dump(mode="json"),
        "label_names": [] if recipe.is_multitask else run.labels,
        "tasks": run.labels if recipe.is_multitask else {recipe.task_names[0]: run.labels},
        "pooling": recipe.model_task.pooling,
        "base_model": {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
                       "fingerprint": run.fingerprint},
        "step": progress.step,
        "epoch": progress.step / run.steps_per_epoch,
        "metrics": results,
        "trainable_parameters": run.trainable,
    }
    return write_checkpoint(run.out / name, run.unwrapped.trainable_state(), info, recipe.to_yaml(),
                            run.tokenizer if recipe.output.save_tokenizer else None)


def save_training_state(run: Run, progress: Progress) -> None:
    """The state a resumed run continues from exactly (every process's random state; written by the main one)."""
    rngs = gather_object([capture_rng()]) if run.accelerator.num_processes > 1 else [capture_rng()]
    if run.main:
        save_state(run.out / "state", run.unwrapped.trainable_state(), run.optimizer, run.scheduler, rngs,
                   {"step": progress.step, "epoch": progress.epoch, "batches_done": progress.batches_done,
                    "best": progress.best, "log_window": [progress.window_loss, progress.window_batches],
                    "recipe": run.recipe.model_dump(mode="json")})


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.2f}" for k, v in values.items())


def validate(run: Run, progress: Progress, counters: Counters, log: MetricsLog) -> dict:
    """Evaluate, log, and keep best/ when the main metric improved."""
    started = time.perf_counter()
    memory.release_free_memory()  # evaluation's larger batches would otherwise grow the heap further
    with run.accelerator.autocast():  # the precision the run trains in, as eval and predict will run it
        results = evaluate(run.model, run.eval_loader, run.accelerator, run.recipe, run.labels, run.tokenizer,
                           run.eval_targets)
    memory.release_free_memory()
    counters.eval_seconds += time.perf_counter() - started
    counters.evaluations += 1
    at_epoch = progress.step / run.steps_per_epoch
    log.write({"step": progress.step, "epoch": round(at_epoch, 3), "eval": results,
               "elapsed_s": round(time.perf_counter() - counters.started, 1)})
    if run.main:
        console.print(f"step {progress.step} (epoch {at_epoch:.2f}): {_format(results)}")
        main_metric = run.recipe.main_metric
        if results[main_metric] > progress.best["value"]:
            progress.best.update(value=results[main_metric], step=progress.step, epoch=at_epoch, metrics=results)
            save_checkpoint(run, "best", progress, results)
    return results


def stop_if_diverged(run: Run, step: int, what: str, value: float) -> None:
    """Stop the run at the first NaN or infinite loss or gradient norm, before the optimizer applies it: what
    was saved before stays the last good state, and nothing non-finite is ever written."""
    if math.isfinite(value):
        return
    cfg = run.recipe.training
    raise UserError(
        f"training diverged at step {step}: the {what} is {value}. The run stopped there; the checkpoints and "
        f"state saved before that step in {str(run.out)!r} are kept. Likely cause: a learning rate too high "
        f"(training.lr={cfg.lr:g}; lower it, e.g. 10x)"
        + (", or an fp16 overflow (use training.mixed_precision=bf16 or a lower training.lr)"
           if cfg.mixed_precision == "fp16" else "")
        + "; otherwise check the data for extreme or broken examples.")


def train_step(run: Run, batch: dict, step: int) -> tuple[torch.Tensor, float | None]:
    """Forward, backward and (at the end of an accumulation) the optimizer step `step`: (loss, prompt gradient
    norm). A non-finite loss or gradient norm stops the run (UserError) before the optimizer step."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.model):
        loss = run.model(**batch, **teacher_outputs(run.teachers, run.unwrapped, batch))["loss"]
        if accelerator.num_processes == 1:
            # With several processes each rank sees only its own loss: stopping one rank before backward would
            # leave the others waiting in the gradient all-reduce. There the gradient norm below, the same on
            # every rank after the all-reduce, stops them all (a NaN loss makes NaN gradients).
            stop_if_diverged(run, step, "loss", loss.item())
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grads = [p.grad.norm() for p in run.unwrapped.prompt.parameters() if p.grad is not None]
            grad_norm = torch.norm(torch.stack(grads)).item()
            if accelerator.scaler is None:  # with fp16, the loss scaler skips steps with inf gradients itself
                stop_if_diverged(run, step, "prompt gradient norm", grad_norm)
            if run.recipe.training.max_grad_norm:
                accelerator.clip_grad_norm_(run.model.parameters(), run.recipe.training.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return loss, grad_norm


def count_batch(counters: Counters, progress: Progress, batch: dict, loss: torch.Tensor, processes: int) -> None:
    rows = batch["labels"].shape[0] * processes
    counters.real_tokens += int(batch["attention_mask"].sum()) * processes
    counters.padded_tokens += batch["attention_mask"].numel() * processes
    counters.train_examples += rows
    counters.window_examples += rows
    progress.window_loss += loss.item()
    progress.window_batches += 1


def log_training(run: Run, progress: Progress, counters: Counters, log: MetricsLog, grad_norm: float | None) -> str:
    """One log line over the batches since the last one; returns the progress bar's status."""
    elapsed = time.perf_counter() - counters.window_start
    record = {"step": progress.step, "epoch": round(progress.step / run.steps_per_epoch, 3),
              "loss": progress.window_loss / progress.window_batches,
              "lr": run.scheduler.get_last_lr()[0], "prompt_grad_norm": grad_norm,
              "examples_per_s": counters.window_examples / elapsed,
              "elapsed_s": round(time.perf_counter() - counters.started, 1)}
    log.write(record)
    progress.window_loss, progress.window_batches = 0.0, 0
    counters.window_examples, counters.window_start = 0, time.perf_counter()
    return f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['examples_per_s']:.1f} ex/s"


def after_step(run: Run, progress: Progress, counters: Counters, log: MetricsLog, grad_norm: float | None,
               stop: StopRequest) -> str | None:
    """What a finished optimizer step may trigger: heap trim, log line, evaluation, state, a requested stop.
    Returns the progress bar's new status, if any."""
    cfg = run.recipe.training
    step, status = progress.step, None
    if step % memory.EVERY_STEPS == 0:
        memory.release_free_memory()
    if step % cfg.log_steps == 0 or step == run.total_steps:
        status = log_training(run, progress, counters, log, grad_norm)
    end_of_epoch = progress.batches_done == len(run.train_loader)
    evaluated_next = (end_of_epoch and cfg.eval_each_epoch) or step >= run.total_steps  # by train_epoch
    if cfg.eval_steps and step % cfg.eval_steps == 0 and not evaluated_next:
        validate(run, progress, counters, log)
    if cfg.save_state_steps and step % cfg.save_state_steps == 0 and not end_of_epoch:
        save_training_state(run, progress)
    if stop_everywhere(stop, run.accelerator):
        save_training_state(run, progress)
        finish(run.accelerator)
        raise TrainingStopped(f"stopped at step {step}; the training state is saved in {run.out / 'state'}. "
                              f"Continue with: softprompt train RECIPE --resume")
    return status


def train_epoch(run: Run, progress: Progress, counters: Counters, log: MetricsLog, bar: tuple,
                stop: StopRequest) -> dict | None:
    """The rest of the current epoch (or up to the last step); its evaluation results when it ends one."""
    run.train_loader.set_epoch(progress.epoch)
    # A resumed run skips the batches the stopped run already trained on in this epoch.
    skip = progress.batches_done
    batches = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    for batch in batches:
        loss, grad_norm = train_step(run, batch, progress.step + 1)
        progress.batches_done += 1
        count_batch(counters, progress, batch, loss, run.accelerator.num_processes)
        if not run.accelerator.sync_gradients:
            continue
        progress.step += 1
        status = after_step(run, progress, counters, log, grad_norm, stop)
        bar[0].update(bar[1], completed=progress.step, **({"status": status} if status else {}))
        if progress.step >= run.total_steps:
            break
    results = None
    end_of_epoch = progress.batches_done == len(run.train_loader) and run.recipe.training.eval_each_epoch
    if end_of_epoch or progress.step >= run.total_steps:
        results = validate(run, progress, counters, log)
    if progress.batches_done == len(run.train_loader):
        progress.epoch, progress.batches_done = progress.epoch + 1, 0
    save_training_state(run, progress)
    return results


def fit(run: Run, progress: Progress, log: MetricsLog) -> tuple[dict, Counters]:
    """Train to the last step; return the last evaluation's results and the throughput counters."""
    bar = ProgressBar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, disable=not run.main)
    counters = Counters()
    results: dict = {}
    run.model.train()
    with bar, StopRequest() as stop:
        task = bar.add_task("train", total=run.total_steps, completed=progress.step, status="")
        while progress.step < run.total_steps:
            results = train_epoch(run, progress, counters, log, (bar, task), stop) or results
    return results, counters


def summarize(run: Run, progress: Progress, results: dict, counters: Counters) -> dict[str, Any]:
    minutes = (time.perf_counter() - counters.started) / 60
    # Training time excludes evaluation (it includes the few milliseconds of writing small checkpoints).
    train_seconds = 60 * minutes - counters.eval_seconds
    eval_rows = counters.evaluations * len(run.eval_loader.dataset)
    return {"method": run.recipe.method.name, "final": results, "best": progress.best.get("metrics", {}),
            "best_step": progress.best.get("step"), "trainable_parameters": run.trainable,
            "minutes": round(minutes, 2), "output_dir": str(run.out), "train_seconds": round(train_seconds, 2),
            "train_examples_per_s": round(counters.train_examples / train_seconds, 2),
            "eval_examples_per_s": round(eval_rows / max(counters.eval_seconds, 1e-9), 2),
            "real_tokens": counters.real_tokens, "padded_tokens": counters.padded_tokens, "steps": progress.step,
            "mixed_precision": run.recipe.training.mixed_precision}


def announce(run: Run, progress: Progress, resumed: bool) -> None:
    recipe = run.recipe
    console.print(
        f"[bold]{recipe.method.name}[/] on {recipe.model.name_or_path}: {run.trainable:,} trainable parameters "
        f"({len(run.train_loader.dataset):,} train / {len(run.eval_loader.dataset):,} eval examples, "
        f"{run.total_steps} steps, {run.accelerator.num_processes} process(es), "
        f"precision {precision.display_name(recipe.training.mixed_precision)})"
        + (f", resumed at step {progress.step}" if resumed else "")
    )


def report(run: Run, progress: Progress, summary: dict) -> None:
    """final/, summary.json and the closing line (main process)."""
    summary["checkpoint_bytes"] = save_checkpoint(run, "final", progress, summary["final"])
    write_small_file(run.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    console.print(
        f"[bold green]done[/] in {summary['minutes']:.1f} min. final: {_format(summary['final'])}; best (step "
        f"{progress.best.get('step')}): {_format(progress.best.get('metrics', {}))}\ncheckpoints: "
        f"{run.out / 'best'}, {run.out / 'final'} ({summary['checkpoint_bytes'] / 1024:.1f} KB of weights, "
        f"{run.trainable:,} trainable parameters)"
    )


def train(recipe: Recipe, resume: Path | None = None) -> dict[str, Any]:
    """Train as the recipe says (continuing the state saved in `resume`); return the run's summary."""
    accelerator = make_accelerator(recipe)
    # What runs (auto resolved) is what the run's recipe.yaml and checkpoints record, and eval and predict follow.
    recipe = with_glue_dir(with_precision(recipe, accelerator.mixed_precision))
    with claimed_output(recipe, accelerator):
        return train_claimed(recipe, accelerator, resume)


@contextlib.contextmanager
def claimed_output(recipe: Recipe, accelerator: Accelerator) -> Iterator[None]:
    """Hold the output folder for the run: only the main process writes, so only it locks the folder, before
    anything there is read or written, until the run ends however it ends (an error, a Ctrl-C stop, a kill).
    Every process learns whether the claim succeeded, so that a refused run ends everywhere, not only on the
    main process."""
    with contextlib.ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(output_lock(Path(recipe.output.dir)))
            except UserError as err:
                refusal = err
        if not all_processes_agree(accelerator, refusal is None):
            raise refusal or UserError(f"the main process could not claim output folder {recipe.output.dir!r}; "
                                       "its message says why.")
        yield


def train_claimed(recipe: Recipe, accelerator: Accelerator, resume: Path | None) -> dict[str, Any]:
    """`train` once the output folder is this run's."""
    saved = claim_output(recipe, accelerator, resume)
    if saved is not None:
        recipe = with_saved_batching(recipe, saved["progress"]["recipe"])
    set_seed(recipe.training.seed)
    run = set_up(recipe, accelerator)
    progress = restore(run, saved) if saved is not None else Progress()
    if run.main:
        announce(run, progress, saved is not None)
    with MetricsLog(run.out / "metrics.jsonl", accelerator, keep_until=progress.step if saved else None) as log:
        results, counters = fit(run, progress, log)
        summary = summarize(run, progress, results, counters)
        if run.main:
            report(run, progress, summary)
    finish(accelerator)
    return summary
