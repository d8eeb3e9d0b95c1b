"""The extract stage: encoding units of work into feature sets, in one process or on
a dask cluster.
"""
