"""Probes on cached features: linear, kNN, segmentation heads, metrics. Never loads an
encoder or reads images; torch only inside the trainable heads.
"""
