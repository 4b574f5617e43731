"""The Ray side of distmeta: task generators -> workers -> parameter server, driven by train.py."""
