"""The command line: parse, load the recipe, call one function per command.

Heavy modules (torch, transformers, datasets) are imported inside the commands that need them,
so `--help`, `validate` and `methods` start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from softprompt_cli.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train soft prompts (prompt tuning, prefix tuning, P-tuning) on a frozen transformer, from YAML recipes.",
)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="dotted overrides, e.g. training.lr=3e-3 method.num_virtual_tokens=10", show_default=False),
]
DeviceOption = Annotated[str, typer.Option(
    help="where the frozen model runs: auto (the first GPU when torch sees one, else the CPU), cpu, cuda or "
         "cuda:N")]
PrecisionOption = Annotated[str, typer.Option(
    help="checkpoint: each checkpoint in the precision it trained in (its training.mixed_precision, bf16 autocast "
         "included); fp32 or bf16: every checkpoint in that one")]


def _echo_error(message: str, label: str = "error") -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the run saved in <output.dir>/state (or in a state folder given after the "
                         "recipe: softprompt train RECIPE --resume DIR)")] = False,
) -> None:
    """Train a soft prompt as the recipe says; writes best/ and final/ checkpoints."""
    from softprompt_cli.config.load import load_recipe

    overrides = list(overrides or [])
    arguments = " ".join([str(recipe), *overrides])
    state_dir = None
    if resume and overrides and "=" not in overrides[0]:
        state_dir = Path(overrides.pop(0))
    loaded = load_recipe(recipe, overrides)
    if resume and state_dir is None:
        state_dir = Path(loaded.output.dir) / "state"
    from softprompt_cli.commands.train import TrainingStopped, run_train

    try:
        run_train(loaded, state_dir)
    except TrainingStopped as stopped:
        _echo_error(str(stopped).replace("RECIPE", arguments), label="stopped")
        sys.exit(130)


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe, its data files and its model reference without loading the model."""
    from softprompt_cli.commands.validate import validate_recipe

    typer.echo(validate_recipe(recipe, overrides))


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint folder (e.g. runs/<recipe>/best)", show_default=False)],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="overrides of the data section only, e.g. data.max_eval_samples=50", show_default=False)] = None,
    split: Annotated[Optional[str], typer.Option(help="split to evaluate (default: the recipe's eval split)")] = None,
    model: Annotated[Optional[str], typer.Option(help="local copy of the same base model")] = None,
    output: Annotated[Optional[Path], typer.Option(help="write the metrics as JSON here")] = None,
    recipe: Annotated[Optional[Path], typer.Option(
        help="evaluate on this recipe's data section (its labels must be the checkpoint's); for a PEFT adapter "
             "folder, also its base model and labels")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="a labelled csv/tsv/jsonl/parquet file, read with the checkpoint's text and label fields",
        show_default=False)] = None,
    task: Annotated[Optional[str], typer.Option(
        help="a multi-task checkpoint: evaluate this task only (default: every task, and their mean)")] = None,
    precision: PrecisionOption = "checkpoint",
) -> None:
    """Evaluate a checkpoint (or a PEFT prompt-learning adapter) on its recipe's eval split, another split, another
    recipe's data (--recipe), a labelled file (--data), or with data.KEY=VALUE overrides. A multi-task checkpoint
    reports every task's metrics and their mean."""
    from softprompt_cli.commands.arguments import check_checkpoint_folder, check_eval_options, check_precision_option
    from softprompt_cli.config.load import load_recipe

    check_checkpoint_folder(checkpoint)  # cheap checks first: torch takes seconds to import
    check_precision_option(precision)
    data_recipe = load_recipe(recipe) if recipe else None
    check_eval_options(checkpoint, split, data_recipe, data, list(overrides or []))
    from softprompt_cli.commands.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, split, model, output, data_recipe, data, list(overrides or []), task,
                                 precision)
    from accelerate import PartialState
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{checkpoint} on {report['split']} ({report['examples']} examples, {report['precision']})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, f"{100 * value:.2f}")
    if PartialState().is_main_process:
        Console().print(table)


@app.command()
def predict(
    checkpoints: Annotated[list[str], typer.Argument(
        help="checkpoint folders of one base model, as DIR or NAME=DIR (the task name rows refer to; a multi-task "
             "checkpoint's tasks are named by its recipe, or NAME/TASK)",
        show_default=False)],
    input_file: Annotated[Optional[Path], typer.Option(
        "--input", help="csv, tsv, jsonl or parquet with the text columns")] = None,
    text: Annotated[Optional[list[str]], typer.Option(help="a text to classify (repeatable)")] = None,
    text_pair: Annotated[Optional[list[str]], typer.Option(help="its pair text, for pair tasks")] = None,
    output: Annotated[Optional[Path], typer.Option(help=".jsonl, .csv or .tsv (default: jsonl on stdout)")] = None,
    task_column: Annotated[str, typer.Option(help="column naming each row's task; without it every row "
                                                  "goes to every task")] = "task",
    task: Annotated[Optional[str], typer.Option(
        help="send every row to this task (a checkpoint's NAME, or a multi-task checkpoint's task), whatever "
             "the task column says")] = None,
    text_field: Annotated[Optional[list[str]], typer.Option(
        help="text column(s) to read (default: the recipe's)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    model: Annotated[Optional[str], typer.Option(help="local copy of the same base model")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="causal_lm generation: tokens to generate (default: the recipe's task.max_new_tokens)")] = None,
    do_sample: Annotated[bool, typer.Option(
        "--do-sample", help="causal_lm generation: sample instead of greedy")] = False,
    temperature: Annotated[float, typer.Option(min=1e-4, help="with --do-sample")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="with --do-sample: keep the k likeliest tokens (0: all)")] = 0,
    top_p: Annotated[float, typer.Option(min=1e-4, max=1.0, help="with --do-sample: nucleus sampling")] = 1.0,
    seed: Annotated[int, typer.Option(help="with --do-sample: the random seed")] = 0,
    precision: PrecisionOption = "checkpoint",
    device: DeviceOption = "auto",
) -> None:
    """Predict labels with one or several checkpoints; rows of different tasks share forward batches.
    causal_lm checkpoints rank their label words, or generate text (free-form targets)."""
    from softprompt_cli.commands.arguments import check_device_option, check_precision_option, check_predict_input

    check_predict_input(input_file, text or [], text_pair or [])  # cheap checks first: torch takes seconds to import
    check_precision_option(precision)
    check_device_option(device)
    from softprompt_cli.commands.predict import Generation, run_predict

    sampling = None
    if do_sample:
        import torch

        from softprompt_cli.model.lm import Sampling

        sampling = Sampling(temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    run_predict(checkpoints, input_file, text or [], text_pair or [], output, task_column, text_field, batch_size,
                model, Generation(max_new_tokens, sampling), task, precision, device)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint folder", show_default=False)],
    out: Annotated[Path, typer.Argument(help="folder to write the adapter into", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="peft: a PEFT prompt-learning adapter folder")] = "peft",
    model: Annotated[Optional[str], typer.Option(help="local copy of the same base model")] = None,
) -> None:
    """Export a checkpoint for other tools (PEFT: PeftModel.from_pretrained(base_model, OUT))."""
    if format != "peft":
        raise UserError(f"--format {format!r} is not supported; the supported format is peft.")
    from softprompt_cli.commands.export import export_peft

    written, note = export_peft(checkpoint, out, model)
    typer.echo(f"wrote {written}")
    if note:
        typer.echo(note, err=True)


@app.command("init-prefix-from-text")
def init_prefix_from_text(
    model: Annotated[str, typer.Option(help="base model: local folder or hub id", show_default=False)],
    num_virtual_tokens: Annotated[int, typer.Option(min=1, help="prefix length (tokens of the text kept)",
                                                    show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="checkpoint folder to write", show_default=False)],
    text: Annotated[Optional[str], typer.Option(help="the text")] = None,
    text_file: Annotated[Optional[Path], typer.Option(help="a file holding the text")] = None,
    chat_template: Annotated[bool, typer.Option(help="apply the tokenizer's chat template first")] = False,
    revision: Annotated[Optional[str], typer.Option(help="hub revision of the model")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
    gguf_file: Annotated[Optional[str], typer.Option(
        help="a GGUF file in the model folder (as model.gguf_file)")] = None,
) -> None:
    """Write a prefix-tuning checkpoint from the keys and values a text leaves in the frozen model.

    Start training from it with method.init: from_checkpoint and method.init_checkpoint: DIR."""
    if (text is None) == (text_file is None):
        raise UserError("give either --text or --text-file (one of them).")
    if text_file is not None:
        if not text_file.is_file():
            raise UserError(f"--text-file {str(text_file)!r} does not exist.")
        text = text_file.read_text(encoding="utf-8")
    from softprompt_cli.commands.init_prefix import init_prefix_from_text as run

    tokens, size = run(model, text, num_virtual_tokens, output, revision, chat_template, overwrite, gguf_file)
    typer.echo(f"wrote {output}: a {num_virtual_tokens}-token prefix from a {tokens}-token text "
               f"({size / 1024:.1f} KB)")


@app.command()
def compare(
    recipes: Annotated[list[Path], typer.Argument(help="recipe file(s)", show_default=False)],
    methods: Annotated[Optional[str], typer.Option(help="comma-separated methods (default: all)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per method (recipe seed, +1, ...)")] = 1,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="default: runs/compare-<recipe>")] = None,
    overwrite: Annotated[bool, typer.Option(help="write into a non-empty output folder")] = False,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override for every run, e.g. training.epochs=2")] = None,
) -> None:
    """Train several methods on the same data, model, budget and seeds; write report.md, report.png, summary.json."""
    from softprompt_cli.commands.compare import compare as run_compare

    out = output or Path("runs") / f"compare-{recipes[0].stem}"
    run_compare(recipes, [m.strip() for m in methods.split(",")] if methods else None, seeds, out, overwrite,
                set_ or [])


@app.command()
def serve(
    checkpoints: Annotated[list[str], typer.Argument(
        help="checkpoint folders (a run's best/ or final/, or the run folder), NAME=DIR, PEFT prompt-learning "
             "adapters, or folders holding them", show_default=False)],
    host: Annotated[str, typer.Option(help="address to listen on (loopback only by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: Annotated[Optional[str], typer.Option(help="the base model's location, if it moved (same model)")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="SOFTPROMPT_API_KEY", show_default=False,
        help="require 'Authorization: Bearer KEY' on every endpoint")] = None,
    admin_root: Annotated[Optional[Path], typer.Option(
        help="enable POST /admin/load and /admin/unload, for checkpoints under this folder only")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="rows per forward pass")] = 32,
    max_queue: Annotated[int, typer.Option(min=1, help="waiting requests before 503")] = 256,
    max_input_tokens: Annotated[int, typer.Option(min=1, help="tokens per prompt or input")] = 2048,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="largest max_tokens a request may ask")] = 512,
    max_inputs: Annotated[int, typer.Option(min=1, help="inputs per /v1/classify request")] = 128,
    chat_template: Annotated[Optional[Path], typer.Option(
        help="Jinja chat template for /v1/chat/completions (default: the tokenizer's)")] = None,
    one_prompt_per_batch: Annotated[bool, typer.Option(
        help="batch only requests of the same soft prompt together (to measure what cross-prompt batching "
             "gives)")] = False,
    device: DeviceOption = "auto",
    access_log: Annotated[bool, typer.Option(
        help="log every request on stdout (uvicorn's access log); --no-access-log saves its cost under load")] = True,
) -> None:
    """Serve soft prompts over HTTP (OpenAI-compatible completions, /v1/classify) from one frozen base model;
    requests for different soft prompts share forward passes."""
    from softprompt_cli.commands.arguments import check_device_option

    check_device_option(device)
    from softprompt_cli.commands.serve import read_chat_template, run_serve
    from softprompt_cli.serving.app import Settings
    from softprompt_cli.serving.engine import Limits

    limits = Limits(max_batch_size, max_queue, one_prompt_per_batch)
    settings = Settings(api_key or None, admin_root, limits, max_input_tokens, max_tokens_limit, max_inputs,
                        read_chat_template(chat_template))
    run_serve(checkpoints, host, port, model, settings, device, access_log)


@app.command()
def methods() -> None:
    """List the soft-prompt methods and their options."""
    from softprompt_cli.commands.methods import print_methods

    print_methods()


cache_app = typer.Typer(
    no_args_is_help=True,
    help="The dequantized GGUF models (model.gguf_file) kept under $HF_HOME/softprompt/gguf, which later runs load "
         "in seconds instead of dequantizing the file again.")
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list() -> None:
    """Show the cache folder and each dequantized GGUF model in it."""
    from softprompt_cli.commands.cache import describe_cache

    typer.echo(describe_cache())


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every dequantized GGUF model (the next run of each dequantizes its file again)."""
    from softprompt_cli.commands.cache import clear_cache

    typer.echo(clear_cache())


def main() -> None:
    try:
        app()
    except UserError as err:
        _echo_error(str(err))
        sys.exit(2)
    except KeyboardInterrupt:
        _echo_error("interrupted.")
        sys.exit(130)
