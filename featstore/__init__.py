"""featstore: frozen foundation-model features for medical images, computed once, probed often.

The Python API (see docs/api.md, "Python API"): `open_features`, `extract`, `probe`.
"""

from featstore.api import compare, extract, open_features, predictions, probe, scale_steps

__version__ = "0.1.0"
__all__ = ["compare", "extract", "open_features", "predictions", "probe", "scale_steps"]
