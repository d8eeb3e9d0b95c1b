"""featstore: frozen foundation-model features for medical images, computed once, probed often.

The Python API (see docs/api.md, "Python API"): `open_features`, `extract`, `probe`.
"""

from featstore.api import extract, open_features, probe

__version__ = "0.1.0"
__all__ = ["extract", "open_features", "probe"]
