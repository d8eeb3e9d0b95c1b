"""Encoders behind one protocol, their preprocessing, and the batches fed to them."""
