"""The extract stage: one driver (`run.extract_manifest`) turns a manifest into feature
sets; a runner computes the units of work, in this process (`local`) or as tasks on a
dask cluster (`cluster`).
"""
