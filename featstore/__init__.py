"""featstore: frozen foundation-model features for medical images, computed once, probed often."""

__version__ = "0.1.0"
