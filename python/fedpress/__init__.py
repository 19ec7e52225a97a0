"""fedpress: compress federated-learning updates, measured in bytes on the wire."""

from __future__ import annotations

from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
