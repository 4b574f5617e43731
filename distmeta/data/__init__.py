"""Datasets on disk: Arrow shards (``shards.py``) and the ingest that writes them (``omniglot.py``)."""
