"""xnatio: fast, resumable, verified DICOM uploads into XNAT."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
