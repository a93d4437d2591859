"""The configuration reference, generated from the ``Config`` dataclasses and their field docstrings.

``docs/config.md`` holds the output of :func:`reference` between
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->``.
``python -m distcomp.docs`` rewrites that part of the page, ``--check`` only
compares it, and a test keeps the two identical.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
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


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def summary(cls: type) -> str:
    """The first line of ``cls``'s docstring: the one-line description under each heading of the reference."""
    doc = inspect.getdoc(cls)
    if not doc:
        raise ValueError(f"{cls.__qualname__} has no docstring; its first line heads its section of the reference")
    return doc.splitlines()[0]


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
        parts.append(f"#### `compressor: {name}`\n\n{summary(cls)}\n\n{table(cls.Config)}")
    return "\n\n".join(parts)


def optimizer_reference() -> str:
    """One section per compressed optimizer (its keyword arguments, DeepSpeed's names)."""
    from distcomp.train.config import COMPRESSED_OPTIMIZERS

    parts = [
        "Keyword arguments of the optimizers, which are also the keys of their sections in a training "
        "config (`optimizer.onebit_adam:` ...). There, `lr`, `betas`, `eps` and `weight_decay` default to "
        "the `optimizer:` section's values."
    ]
    for name, cls in COMPRESSED_OPTIMIZERS.items():
        parts.append(
            f"#### `distcomp.optim.{cls.__name__}` (`optimizer.name: {name}`)\n\n{summary(cls)}\n\n{table(cls.Config)}"
        )
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
    """The whole configuration reference, as embedded in docs/config.md."""
    return (
        "### Training config\n\n"
        + train_reference()
        + "\n\n### Compressors\n\n"
        + compression_reference()
        + "\n\n### Compressed optimizers\n\n"
        + optimizer_reference()
        + "\n"
    )


CONFIG_PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
"""The page that embeds the reference: ``docs/config.md`` of a source checkout."""
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def embedded(text: str, where: Path | str = CONFIG_PAGE) -> tuple[int, int]:
    """Start and end offsets of the generated part of ``text`` (between the markers)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{where}: no '{START.strip()}' ... '{END}' markers; put them back around the reference")
    return start + len(START), end


def write_reference(page: Path = CONFIG_PAGE) -> bool:
    """Replace the generated part of ``page`` with :func:`reference`; True when the file changed."""
    text = page.read_text(encoding="utf-8")
    start, end = embedded(text, page)
    new = text[:start] + reference() + text[end:]
    if new == text:
        return False
    page.write_text(new, encoding="utf-8")
    return True


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distcomp.docs",
        description="Regenerate the configuration reference in docs/config.md from the config dataclasses.",
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is out of date")
    parser.add_argument("--stdout", action="store_true", help="print the reference instead of writing the page")
    parser.add_argument("--page", type=Path, default=CONFIG_PAGE, help="the page to update (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.stdout:
        print(reference(), end="")
        return 0
    if not args.page.is_file():
        parser.error(f"{args.page} does not exist; run this from a source checkout or pass --page")
    try:
        if args.check:
            text = args.page.read_text(encoding="utf-8")
            start, end = embedded(text, args.page)
            if text[start:end] != reference():
                print(f"{args.page} is out of date: run `python -m distcomp.docs`", file=sys.stderr)
                return 1
            return 0
        changed = write_reference(args.page)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{args.page}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
