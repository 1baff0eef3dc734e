"""xnatio: fast, resumable, verified DICOM uploads into XNAT."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "upload_many"]


def __getattr__(name: str) -> object:
    # ``xnatio.upload_many(...)`` (docs/api-reference.md), imported on first use only.
    if name in ("upload_many", "ManyOptions"):
        from xnatio.many import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'xnatio' has no attribute {name!r}")
