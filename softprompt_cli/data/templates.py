"""causal_lm templates and label words: which columns a template names, filling it, the words in label order.

Imports nothing heavy: `softprompt validate` uses it.
"""

from __future__ import annotations

import string


def template_fields(template: str) -> list[str]:
    """The columns a causal_lm template names, in order of first use ('{sentence}' -> ['sentence'])."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if any(not name or not name.isidentifier() for name in names):
        raise ValueError("placeholders must be column names such as {sentence}")
    return list(dict.fromkeys(names))


def render(template: str, fields: list[str], values: tuple[str, ...]) -> str:
    return template.format_map(dict(zip(fields, values)))


def label_word_list(label_words: dict, label_names: list[str]) -> list[str]:
    """The label words in label-id order; label_words may be keyed by label name or by id."""
    words, missing = [], []
    for index, name in enumerate(label_names):
        for key in (name, index, str(index)):
            if key in label_words:
                words.append(label_words[key])
                break
        else:
            missing.append(name)
    known = {*label_names, *range(len(label_names)), *map(str, range(len(label_names)))}
    unknown = [key for key in label_words if key not in known]
    if missing or unknown:
        problem = (f"have no word for label(s) {', '.join(map(repr, missing))}" if missing
                   else f"name label(s) {', '.join(map(repr, unknown))} that the data does not have")
        raise ValueError(f"task.label_words {problem}; the labels are {label_names} (key the words by these names "
                         "or by their ids 0, 1, ...)")
    return words
