"""The training loop: recipe -> data + frozen model + soft prompt -> Accelerate loop -> checkpoints."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from softprompt_cli import memory, metrics
from softprompt_cli.checkpoint import RECIPE_FILE, write_checkpoint
from softprompt_cli.data import label_word_ids, loader, tokenize, tokenize_causal
from softprompt_cli.errors import UserError
from softprompt_cli.modeling import (SoftPromptModel, config_fingerprint, enable_checkpointing, load_base_model,
                                    load_tokenizer)
from softprompt_cli.recipe import Recipe
from softprompt_cli.sources import Examples, load_examples
from softprompt_cli.tasks import label_word_list
from softprompt_cli.state import capture_rng, load_state, restore_rng, save_state

console = Console(soft_wrap=True)  # logs stay one line per event when piped


def build_model(recipe: Recipe, label_names: list[str]) -> tuple[SoftPromptModel, Any]:
    spec = recipe.model
    task = recipe.task
    tokenizer = load_tokenizer(spec.name_or_path, spec.revision, spec.trust_remote_code, spec.gguf_file)
    base = load_base_model(spec.name_or_path, revision=spec.revision, dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, pooling=task.pooling,
                           label_names=label_names, task_type=task.type,
                           gguf_file=spec.gguf_file)
    words = None
    if task.type == "causal_lm" and task.label_words is not None:
        try:
            words = label_word_ids(tokenizer, label_word_list(task.label_words, label_names), label_names)
        except ValueError as err:
            raise UserError(str(err)) from None
    model = SoftPromptModel(base, recipe.method, tokenizer, task.pooling, len(label_names), recipe.data.max_length,
                            task.prompt_position, task.type, words)
    if recipe.training.gradient_checkpointing:
        enable_checkpointing(base)
    return model, tokenizer


def linear_warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the learning rate, then linear decay to 0 (transformers' linear schedule; its import
    pulls in the Trainer's dependencies, SciPy and PEFT among them)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def tokenize_examples(recipe: Recipe, examples: Examples, tokenizer, training: bool):
    if recipe.task.type == "causal_lm":
        return tokenize_causal(examples, tokenizer, recipe.data.max_length, training,
                               free_form=recipe.task.target_field is not None)
    return tokenize(examples, tokenizer, recipe.data.max_length, recipe.task.pooling == "pair_mean")


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, recipe: Recipe, num_labels: int, tokenizer,
             targets: list[str] | None, with_prompt: bool = True) -> dict:
    """The recipe's metrics on the eval loader, gathered over processes: predicted labels (a head's argmax,
    or the most likely label word), or generated texts against `targets` (exact match)."""
    unwrapped: SoftPromptModel = accelerator.unwrap_model(model)
    unwrapped.eval()
    predictions, references = [], []
    for batch in eval_loader:
        if "target_index" in batch:
            generated = unwrapped.generate(batch["input_ids"], batch["attention_mask"], recipe.task.max_new_tokens,
                                           tokenizer.eos_token_id, with_prompt=with_prompt)
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            pairs = accelerator.gather_for_metrics(
                [(text, targets[i]) for text, i in zip(texts, batch["target_index"].tolist())])
            predictions += [text for text, _ in pairs]
            references += [target for _, target in pairs]
            continue
        labels = batch.pop("labels")
        scores = unwrapped.scores(**batch, with_prompt=with_prompt)
        gathered = accelerator.gather_for_metrics((scores.argmax(-1), labels))
        predictions += gathered[0].tolist()
        references += gathered[1].tolist()
    unwrapped.train()
    return metrics.compute(recipe.metrics, predictions, references, num_labels)


def finish(accelerator: Accelerator) -> None:
    """End trackers and tear the process group down while every process is still alive: left to
    the garbage collector, gloo's destructor can wait forever for a process that has exited."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    earlier = [p.name for p in (out / "best", out / "final", out / "metrics.jsonl", out / "state") if p.exists()]
    if earlier and not overwrite:
        raise UserError(
            f"output folder {str(out)!r} already holds a run ({', '.join(earlier)}). Choose another output.dir, "
            "set output.overwrite=true to replace it, or continue it with --resume."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


# Settings that may change when a run is resumed; anything else must match the interrupted run.
RESUMABLE_CHANGES = {("training", "epochs"), ("training", "max_steps"), ("training", "save_state_steps"),
                     ("training", "log_steps"), ("training", "eval_steps"), ("output", "overwrite")}


def check_resumable(saved: dict, recipe: Recipe, directory: Path) -> None:
    current = recipe.model_dump(mode="json")
    changed = [f"{section}.{key}" for section, values in current.items() if isinstance(values, dict)
               for key, value in values.items()
               if (section, key) not in RESUMABLE_CHANGES and saved.get(section, {}).get(key) != value]
    if changed:
        raise UserError(f"the recipe differs from the one of the run saved in {str(directory)!r} "
                        f"({', '.join(changed)}). Resume with the same recipe (epochs and max_steps may change).")


class StopRequest:
    """Turns the first Ctrl-C into a request to stop at the next step boundary (where the state
    is consistent and can be saved); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class TrainingStopped(Exception):
    """Raised after a requested stop, once the state is saved; the CLI exits with 130."""


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.2f}" for k, v in values.items())


def train(recipe: Recipe, resume: Path | None = None) -> dict[str, Any]:
    cfg = recipe.training
    out = Path(recipe.output.dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(out),
    )
    main = accelerator.is_main_process
    saved = load_state(resume) if resume is not None else None
    if saved is not None:
        check_resumable(saved["progress"]["recipe"], recipe, resume)
    elif main:
        prepare_output_dir(out, recipe.output.overwrite)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe.to_yaml())
    set_seed(cfg.seed)

    train_examples, eval_examples, label_names = load_examples(recipe.data, recipe.task)
    model, tokenizer = build_model(recipe, label_names)
    train_set = tokenize_examples(recipe, train_examples, tokenizer, training=True)
    eval_set = tokenize_examples(recipe, eval_examples, tokenizer, training=False)
    train_loader = loader(train_set, tokenizer, cfg.batch_size, True, cfg.group_by_length, cfg.seed)
    eval_loader = loader(eval_set, tokenizer, cfg.eval_batch_size, False, True)

    prompt_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("prompt.")]
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prompt.")]
    optimizer = torch.optim.AdamW(
        [{"params": prompt_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr or cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)
    # The prepared scheduler steps once per process per optimizer step, hence the scaling.
    scheduler = accelerator.prepare(linear_warmup_schedule(
        optimizer, warmup * accelerator.num_processes, total_steps * accelerator.num_processes))
    if cfg.tensorboard:
        accelerator.init_trackers("tensorboard", config={"lr": cfg.lr, "batch_size": cfg.batch_size})

    unwrapped: SoftPromptModel = accelerator.unwrap_model(model)
    trainable = sum(p.numel() for p in unwrapped.trainable_state().values())
    fingerprint = config_fingerprint(unwrapped.base.config)
    main_metric = recipe.main_metric
    step, epoch, batches_done = 0, 0, 0
    best: dict[str, Any] = {"value": -math.inf}
    if saved is not None:
        unwrapped.load_trainable_state(saved["params"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        progress_state = saved["progress"]
        step, epoch, batches_done = progress_state["step"], progress_state["epoch"], progress_state["batches_done"]
        best = progress_state["best"] | {"value": progress_state["best"].get("value", -math.inf)}
        restore_rng(saved["rng"][min(accelerator.process_index, len(saved["rng"]) - 1)])
    if main:
        console.print(
            f"[bold]{recipe.method.name}[/] on {recipe.model.name_or_path}: {trainable:,} trainable parameters "
            f"({len(train_set):,} train / {len(eval_set):,} eval examples, {total_steps} steps, "
            f"{accelerator.num_processes} process(es))" + (f", resumed at step {step}" if saved else "")
        )

    def save(name: str, at_step: int, at_epoch: float, results: dict) -> int:
        info = {
            "method": recipe.method.model_dump(mode="json"),
            "label_names": label_names,
            "pooling": recipe.task.pooling,
            "base_model": {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
                           "fingerprint": fingerprint},
            "step": at_step,
            "epoch": at_epoch,
            "metrics": results,
            "trainable_parameters": trainable,
        }
        return write_checkpoint(out / name, unwrapped.trainable_state(), info, recipe.to_yaml(),
                                tokenizer if recipe.output.save_tokenizer else None)

    def save_training_state() -> None:
        rngs = gather_object([capture_rng()]) if accelerator.num_processes > 1 else [capture_rng()]
        if main:
            save_state(out / "state", unwrapped.trainable_state(), optimizer, scheduler, rngs,
                       {"step": step, "epoch": epoch, "batches_done": batches_done, "best": best,
                        "log_window": [window_loss, window_batches], "recipe": recipe.model_dump(mode="json")})

    if main:
        kept = []
        if saved is not None and (out / "metrics.jsonl").exists():  # drop what the stopped run logged later
            kept = [line for line in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["step"] <= step]
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    log_file = (out / "metrics.jsonl").open("a") if main else None

    def log(record: dict) -> None:
        if main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            accelerator.log(numbers | {f"eval/{k}": v for k, v in record.get("eval", {}).items()},
                            step=record["step"])

    timing = {"eval_seconds": 0.0, "evaluations": 0, "real_tokens": 0, "padded_tokens": 0, "train_examples": 0}

    def run_eval() -> dict:
        eval_started = time.perf_counter()
        memory.release_free_memory()  # evaluation's larger batches would otherwise grow the heap further
        results = evaluate(model, eval_loader, accelerator, recipe, len(label_names), tokenizer, eval_examples.targets)
        memory.release_free_memory()
        timing["eval_seconds"] += time.perf_counter() - eval_started
        timing["evaluations"] += 1
        at_epoch = step / steps_per_epoch
        log({"step": step, "epoch": round(at_epoch, 3), "eval": results,
             "elapsed_s": round(time.perf_counter() - started, 1)})
        if main:
            console.print(f"step {step} (epoch {at_epoch:.2f}): {_format(results)}")
            if results[main_metric] > best["value"]:
                best.update(value=results[main_metric], step=step, epoch=at_epoch, metrics=results)
                save("best", step, at_epoch, results)
        return results

    def stop_everywhere(request: StopRequest) -> bool:
        if accelerator.num_processes == 1:
            return request.requested
        flag = torch.tensor([float(request.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console,
                        disable=not main)
    window_loss, window_batches = saved["progress"]["log_window"] if saved else (0.0, 0)
    window_examples, window_start = 0, time.perf_counter()
    started = time.perf_counter()
    results: dict = {}
    model.train()
    with progress, StopRequest() as stop:
        bar = progress.add_task("train", total=total_steps, completed=step, status="")
        while step < total_steps:
            train_loader.set_epoch(epoch)
            # A resumed run skips the batches the stopped run already trained on in this epoch.
            batches = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch)["loss"]
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = torch.norm(torch.stack([p.grad.norm() for p in prompt_params
                                                            if p.grad is not None])).item()
                        if cfg.max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                batches_done += 1
                timing["real_tokens"] += int(batch["attention_mask"].sum()) * accelerator.num_processes
                timing["padded_tokens"] += batch["attention_mask"].numel() * accelerator.num_processes
                timing["train_examples"] += batch["labels"].shape[0] * accelerator.num_processes
                window_loss += loss.item()
                window_batches += 1
                window_examples += batch["labels"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if step % memory.EVERY_STEPS == 0:
                    memory.release_free_memory()
                if step % cfg.log_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                              "loss": window_loss / window_batches,
                              "lr": scheduler.get_last_lr()[0], "prompt_grad_norm": grad_norm,
                              "examples_per_s": window_examples / elapsed,
                              "elapsed_s": round(time.perf_counter() - started, 1)}
                    log(record)
                    progress.update(bar, status=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                                f"{record['examples_per_s']:.1f} ex/s")
                    window_loss, window_batches, window_examples, window_start = 0.0, 0, 0, time.perf_counter()
                progress.update(bar, completed=step)
                end_of_epoch = batches_done == len(train_loader)
                if cfg.eval_steps and step % cfg.eval_steps == 0 and not end_of_epoch:
                    results = run_eval()
                if cfg.save_state_steps and step % cfg.save_state_steps == 0 and not end_of_epoch:
                    save_training_state()
                if stop_everywhere(stop):
                    save_training_state()
                    finish(accelerator)
                    raise TrainingStopped(
                        f"stopped at step {step}; the training state is saved in {out / 'state'}. "
                        f"Continue with: softprompt train RECIPE --resume"
                    )
                if step >= total_steps:
                    break
            if batches_done == len(train_loader) or step >= total_steps:
                results = run_eval()
            epoch, batches_done = (epoch + 1, 0) if batches_done == len(train_loader) else (epoch, batches_done)
            save_training_state()

    minutes = (time.perf_counter() - started) / 60
    # Training time excludes evaluation (it includes the few milliseconds of writing small checkpoints).
    train_seconds = 60 * minutes - timing["eval_seconds"]
    summary = {"method": recipe.method.name, "final": results, "best": best.get("metrics", {}),
               "best_step": best.get("step"), "trainable_parameters": trainable, "minutes": round(minutes, 2),
               "output_dir": str(out), "train_seconds": round(train_seconds, 2),
               "train_examples_per_s": round(timing["train_examples"] / train_seconds, 2),
               "eval_examples_per_s": round(timing["evaluations"] * len(eval_set) / max(timing["eval_seconds"], 1e-9), 2),
               "real_tokens": timing["real_tokens"], "padded_tokens": timing["padded_tokens"], "steps": step}
    if main:
        checkpoint_bytes = save("final", step, step / steps_per_epoch, results)
        summary["checkpoint_bytes"] = checkpoint_bytes
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log_file.close()
        console.print(
            f"[bold green]done[/] in {minutes:.1f} min. final: {_format(results)}; best (step {best.get('step')}): "
            f"{_format(best.get('metrics', {}))}\ncheckpoints: {out / 'best'}, {out / 'final'} "
            f"({checkpoint_bytes / 1024:.1f} KB of weights, {trainable:,} trainable parameters)"
        )
    finish(accelerator)
    return summary
