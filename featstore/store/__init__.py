"""The feature-set contract: schema, the `FeatureSet` handle, integrity, catalog,
claims, the int8 codec both ways, and how a set appears and vanishes in one step
(`location`; the folder or URL itself is `featstore.places`). Never imports torch.
"""
