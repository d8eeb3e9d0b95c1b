"""The feature-set contract: schema, sets, integrity, catalog and locations (folders
or fsspec URLs). Never imports torch.
"""
