"""Reading datasets: the manifest, one reader per format (its pixel rules in `layouts`),
file fingerprints and the synthetic default.
"""
