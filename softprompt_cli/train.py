"""The training loop: recipe -> data + frozen model + soft prompt -> Accelerate loop -> checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from softprompt_cli import metrics
from softprompt_cli.checkpoint import RECIPE_FILE, write_checkpoint
from softprompt_cli.data import loader, tokenize
from softprompt_cli.errors import UserError
from softprompt_cli.modeling import SoftPromptModel, config_fingerprint, load_base_model, load_tokenizer
from softprompt_cli.recipe import Recipe
from softprompt_cli.sources import load_examples

console = Console(soft_wrap=True)  # logs stay one line per event when piped


def build_model(recipe: Recipe, label_names: list[str]) -> tuple[SoftPromptModel, Any]:
    spec = recipe.model
    tokenizer = load_tokenizer(spec.name_or_path, spec.revision, spec.trust_remote_code)
    base = load_base_model(spec.name_or_path, revision=spec.revision, dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, pooling=recipe.task.pooling,
                           label_names=label_names, prefix=recipe.method.kind == "prefix")
    model = SoftPromptModel(base, recipe.method, tokenizer, recipe.task.pooling, len(label_names),
                            recipe.data.max_length)
    return model, tokenizer


@torch.no_grad()
def evaluate(model, eval_loader, accelerator: Accelerator, metric_names: list[str], num_labels: int) -> dict:
    model.eval()
    predictions, references = [], []
    for batch in eval_loader:
        labels = batch.pop("labels")
        logits = model(**batch)["logits"]
        gathered = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        predictions += gathered[0].tolist()
        references += gathered[1].tolist()
    model.train()
    return metrics.compute(metric_names, predictions, references, num_labels)


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    earlier = [p.name for p in (out / "best", out / "final", out / "metrics.jsonl") if p.exists()]
    if earlier and not overwrite:
        raise UserError(
            f"output folder {str(out)!r} already holds a run ({', '.join(earlier)}). Choose another output.dir, or "
            "set output.overwrite=true to replace it."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def _format(values: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.2f}" for k, v in values.items())


def train(recipe: Recipe) -> dict[str, Any]:
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
    if main:
        prepare_output_dir(out, recipe.output.overwrite)
        (out / RECIPE_FILE).write_text(recipe.to_yaml())
    set_seed(cfg.seed)

    train_examples, eval_examples, label_names = load_examples(recipe.data)
    model, tokenizer = build_model(recipe, label_names)
    train_set = tokenize(train_examples, tokenizer, recipe.data.max_length, recipe.task.pooling == "pair_mean")
    eval_set = tokenize(eval_examples, tokenizer, recipe.data.max_length, recipe.task.pooling == "pair_mean")
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
    scheduler = accelerator.prepare(get_linear_schedule_with_warmup(
        optimizer, warmup * accelerator.num_processes, total_steps * accelerator.num_processes))
    if cfg.tensorboard:
        accelerator.init_trackers("tensorboard", config={"lr": cfg.lr, "batch_size": cfg.batch_size})

    unwrapped: SoftPromptModel = accelerator.unwrap_model(model)
    trainable = sum(p.numel() for p in unwrapped.trainable_state().values())
    fingerprint = config_fingerprint(unwrapped.base.config)
    metric_names = recipe.metrics
    main_metric = recipe.main_metric
    if main:
        console.print(
            f"[bold]{recipe.method.name}[/] on {recipe.model.name_or_path}: {trainable:,} trainable parameters "
            f"({len(train_set):,} train / {len(eval_set):,} eval examples, {total_steps} steps, "
            f"{accelerator.num_processes} process(es))"
        )

    def save(name: str, step: int, epoch: float, results: dict) -> int:
        info = {
            "method": recipe.method.model_dump(mode="json"),
            "label_names": label_names,
            "pooling": recipe.task.pooling,
            "base_model": {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision,
                           "fingerprint": fingerprint},
            "step": step,
            "epoch": epoch,
            "metrics": results,
            "trainable_parameters": trainable,
        }
        return write_checkpoint(out / name, unwrapped.trainable_state(), info, recipe.to_yaml(),
                                tokenizer if recipe.output.save_tokenizer else None)

    log_file = (out / "metrics.jsonl").open("a") if main else None

    def log(record: dict) -> None:
        if main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            accelerator.log(numbers | {f"eval/{k}": v for k, v in record.get("eval", {}).items()},
                            step=record["step"])

    best: dict[str, Any] = {"value": -math.inf}
    checkpoint_bytes = 0

    def run_eval(step: int, epoch: float) -> dict:
        nonlocal checkpoint_bytes
        results = evaluate(model, eval_loader, accelerator, metric_names, len(label_names))
        log({"step": step, "epoch": round(epoch, 3), "eval": results,
             "elapsed_s": round(time.perf_counter() - started, 1)})
        if main:
            console.print(f"step {step} (epoch {epoch:.2f}): {_format(results)}")
            if results[main_metric] > best["value"]:
                best.update(value=results[main_metric], step=step, epoch=epoch, metrics=results)
                checkpoint_bytes = save("best", step, epoch, results)
        return results

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console,
                        disable=not main)
    step, window_loss, window_batches, window_examples, window_start = 0, 0.0, 0, 0, time.perf_counter()
    started = time.perf_counter()
    results: dict = {}
    model.train()
    with progress:
        bar = progress.add_task("train", total=total_steps, status="")
        for epoch in range(epochs):
            train_loader.set_epoch(epoch)
            for batch in train_loader:
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
                window_loss += loss.item()
                window_batches += 1
                window_examples += batch["labels"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                step += 1
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
                if cfg.eval_steps and step % cfg.eval_steps == 0 and step % steps_per_epoch != 0:
                    results = run_eval(step, step / steps_per_epoch)
                if step >= total_steps:
                    break
            results = run_eval(step, step / steps_per_epoch)
            if step >= total_steps:
                break

    minutes = (time.perf_counter() - started) / 60
    summary = {"method": recipe.method.name, "final": results, "best": best.get("metrics", {}),
               "best_step": best.get("step"), "trainable_parameters": trainable, "minutes": round(minutes, 2),
               "output_dir": str(out)}
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
    accelerator.end_training()
    return summary
