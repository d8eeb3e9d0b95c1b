"""Probes on cached features: linear, kNN, ABMIL, segmentation heads, metrics and
intervals, and paired comparisons of encoders. Never loads an encoder or reads images;
torch only inside the trainable heads.
"""
