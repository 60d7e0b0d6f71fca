"""The decoding-method registry. Adding a method = one module + one line in ``METHOD_MODULES``."""
from __future__ import annotations

from vlmguard.registry import Registry

DECODERS: Registry = Registry("decoding")
