"""The configuration reference, generated from the ``Config`` dataclasses and their field docstrings.

README.md embeds the output of ``python -m distcomp.docs`` between
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->``; a test
keeps the two identical.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

from distcomp.registry import available_compressors, get_compressor


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literals placed under each field, across base classes."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "(required)"


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def table(cls: type, prefix: str = "") -> str:
    """A markdown table of ``cls``'s fields: key, default, meaning."""
    docs = field_docs(cls)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        rows.append(f"| `{prefix}{f.name}` | `{_fmt(_default(f))}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)


def compression_reference() -> str:
    """One section per registered compressor."""
    parts = []
    for name in available_compressors():
        cls = get_compressor(name)
        summary = inspect.getdoc(cls).splitlines()[0]
        parts.append(f"#### `compressor: {name}`\n\n{summary}\n\n{table(cls.Config)}")
    return "\n\n".join(parts)


def optimizer_reference() -> str:
    """One section per compressed optimizer (its keyword arguments, DeepSpeed's names)."""
    from distcomp.train.config import COMPRESSED_OPTIMIZERS

    parts = ["Keyword arguments of the optimizers, which are also the keys of their sections in a training "
             "config (`optimizer.onebit_adam:` ...). There, `lr`, `betas`, `eps` and `weight_decay` default to "
             "the `optimizer:` section's values."]
    for name, cls in COMPRESSED_OPTIMIZERS.items():
        summary = inspect.getdoc(cls).splitlines()[0]
        parts.append(f"#### `distcomp.optim.{cls.__name__}` (`optimizer.name: {name}`)\n\n{summary}\n\n"
                     f"{table(cls.Config)}")
    return "\n\n".join(parts)


def train_reference() -> str:
    """The ``distcomp train`` config: top-level keys, then one table per section."""
    from distcomp.train.config import TrainConfig

    docs = field_docs(TrainConfig)
    top, sections = [], []
    for f in dataclasses.fields(TrainConfig):
        default = _default(f)
        if dataclasses.is_dataclass(default) and f.name != "compression":
            sections.append(f"#### `{f.name}:`\n\n{docs.get(f.name, '')}\n\n{table(type(default), f.name + '.')}")
        else:
            shown = "powersgd" if f.name == "compression" else _fmt(default)
            top.append(f"| `{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    head = "#### `distcomp train` top level\n\n| key | default | meaning |\n|---|---|---|\n" + "\n".join(top)
    return "\n\n".join([head, *sections])


def reference() -> str:
    """The whole configuration reference, as embedded in README.md."""
    return ("### Training config\n\n" + train_reference() + "\n\n### Compressors\n\n" + compression_reference()
            + "\n\n### Compressed optimizers\n\n" + optimizer_reference() + "\n")


if __name__ == "__main__":
    print(reference(), end="")
