"""Fixtures shared by the sandbox's in-process tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatio.sandbox.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh sandbox store, every well-formed project ID readable (no access rules)."""
    s = Store(tmp_path / "data")
    s.access = None  # type: ignore[assignment]  # every well-formed project ID is readable
    yield s
    s.close()
