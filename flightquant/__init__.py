"""flightquant: an Apache Arrow Flight data-plane server that quantizes float tensors."""

from __future__ import annotations

__version__ = "0.1.0"
