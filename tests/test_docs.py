"""README's configuration reference is the one generated from the config dataclasses."""

from __future__ import annotations

from pathlib import Path

from distcomp.docs import field_docs, reference
from distcomp.registry import available_compressors, get_compressor

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def test_readme_reference_is_up_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    embedded = text[text.index(START) + len(START) : text.index(END)]
    assert embedded == reference(), "run `python -m distcomp.docs` and paste its output into README.md"


def test_every_compressor_field_has_a_docstring() -> None:
    import dataclasses

    for name in available_compressors():
        cls = get_compressor(name).Config
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{name}: fields without a docstring: {missing}"


def test_every_compressed_optimizer_field_has_a_docstring() -> None:
    import dataclasses

    from distcomp.train.config import COMPRESSED_OPTIMIZERS

    for name, cls in COMPRESSED_OPTIMIZERS.items():
        docs = field_docs(cls.Config)
        missing = [f.name for f in dataclasses.fields(cls.Config) if not docs.get(f.name)]
        assert not missing, f"{name}: fields without a docstring: {missing}"
