"""Talking to XNAT over HTTP: the shared authenticated client and its error reading."""

from xnatio.xnat.client import XnatClient
from xnatio.xnat.errors import TransientError

__all__ = ["TransientError", "XnatClient"]
