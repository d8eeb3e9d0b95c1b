"""Encoders behind one protocol (a module per backend, the weight files checked), and
their preprocessing on the CPU and on the device."""
