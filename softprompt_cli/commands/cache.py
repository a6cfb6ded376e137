"""`softprompt cache list` and `softprompt cache clear`: the dequantized copies of GGUF models that later runs load
instead of dequantizing the file again (softprompt_cli.gguf_cache). Imports no torch."""

from __future__ import annotations

from softprompt_cli import gguf_cache


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _line(entry: gguf_cache.EntryStatus) -> str:
    line = f"  {entry.folder.name}  {_megabytes(entry.size)}  from {entry.source}"
    if entry.problem is not None:
        return f"{line}  (damaged: {entry.problem}; written again when next needed)"
    if not entry.current:
        return f"{line}  (not used: its GGUF file changed or is gone, or transformers or gguf changed since)"
    return line


def describe_cache() -> str:
    """The cache folder and its entries, one a line."""
    statuses = [gguf_cache.status(entry) for entry in gguf_cache.entries()]
    where = str(gguf_cache.cache_dir())
    if not statuses:
        return f"{where}: no dequantized GGUF models (a GGUF model's first run writes one)."
    total = sum(entry.size for entry in statuses)
    return "\n".join([f"{where}: {len(statuses)} dequantized GGUF model(s), {_megabytes(total)}",
                      *map(_line, statuses)])


def clear_cache() -> str:
    removed, freed = gguf_cache.clear()
    return (f"removed {removed} dequantized GGUF model(s) from {str(gguf_cache.cache_dir())!r} ({_megabytes(freed)}); "
            "the next run of each GGUF model dequantizes its file again.")
