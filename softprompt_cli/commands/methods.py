"""`softprompt methods`: the registered methods and their options (imports no torch)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from softprompt_cli.methods.base import registry


def print_methods() -> None:
    console = Console()
    for name, options in registry().items():
        table = Table(title=f"{name}: {options.__doc__.strip()}", title_justify="left", show_edge=False)
        for column in ("option", "type", "default", "description"):
            table.add_column(column)
        for field_name, field in options.model_fields.items():
            if field_name == "name":
                continue
            annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
            table.add_row(field_name, annotation.replace("typing.", ""), repr(field.default), field.description or "")
        console.print(table)
        console.print()
