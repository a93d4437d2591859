"""docs/config.md's configuration reference is the one generated from the config dataclasses."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from distcomp.docs import CONFIG_PAGE, END, START, embedded, field_docs, reference, write_reference
from distcomp.registry import available_compressors, get_compressor

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def test_config_page_is_the_repository_page() -> None:
    assert CONFIG_PAGE == ROOT / "docs" / "config.md"


def test_config_reference_is_up_to_date() -> None:
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    start, end = embedded(text)
    assert text[start:end] == reference(), "run `python -m distcomp.docs` to regenerate docs/config.md"


def test_readme_links_to_the_config_reference() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/config.md)" in readme
    assert START.strip() not in readme, "the generated reference lives in docs/config.md only"


def test_write_reference_replaces_only_the_generated_part(tmp_path: Path) -> None:
    page = tmp_path / "config.md"
    shutil.copy(CONFIG_PAGE, page)
    text = page.read_text(encoding="utf-8")
    start, end = embedded(text)
    page.write_text(text[:start] + "stale\n" + text[end:], encoding="utf-8")
    assert write_reference(page) is True
    assert page.read_text(encoding="utf-8") == text
    assert write_reference(page) is False


def test_a_page_without_markers_is_named(tmp_path: Path) -> None:
    page = tmp_path / "config.md"
    page.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(page)) + ".*markers"):
        write_reference(page)
    assert END not in page.read_text(encoding="utf-8")


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
