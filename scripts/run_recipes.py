"""Train shipped recipes one after another and print the README's results table (markdown).

    python scripts/run_recipes.py recipes/mrpc_*.yaml            # train, then print the table
    python scripts/run_recipes.py --table-only recipes/mrpc_*.yaml   # only read runs/<recipe>/summary.json

Each run is a separate `softprompt train` process (a fresh interpreter per recipe), with
`output.overwrite=true`. Minutes are wall-clock training time as the run measured it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml


def summary_of(recipe: Path) -> dict:
    output = yaml.safe_load(recipe.read_text()).get("output", {}).get("dir") or f"runs/{recipe.stem}"
    return json.loads((Path(output) / "summary.json").read_text())


def row(recipe: Path, summary: dict) -> str:
    def metrics(values: dict) -> str:
        return " / ".join(f"{100 * v:.1f}" for v in values.values())

    names = " / ".join(summary["final"])
    return (f"| `{recipe.stem}` | {summary['method']} | {summary['trainable_parameters']:,} | "
            f"{summary['checkpoint_bytes'] / 1024:.1f} KB | {names} | {metrics(summary['final'])} | "
            f"{metrics(summary['best'])} | {summary['minutes']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--table-only", action="store_true", help="do not train; read existing summaries")
    parser.add_argument("overrides", nargs="*", default=[], help="extra key=value overrides for every run")
    args = parser.parse_args()
    if not args.table_only:
        for recipe in args.recipes:
            command = ["softprompt", "train", str(recipe), "output.overwrite=true", *args.overrides]
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True)
    print("| recipe | method | trainable params | checkpoint | metrics | dev, final | dev, best epoch | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        print(row(recipe, summary_of(recipe)))


if __name__ == "__main__":
    sys.exit(main())
