"""Reading datasets: the manifest, one reader per format, file fingerprints and
the synthetic default.
"""
