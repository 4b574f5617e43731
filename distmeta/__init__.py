__version__ = "0.3.0"

__all__ = ["adapt"]


def __getattr__(name: str):
    # distmeta.adapt on first use: `import distmeta` (the command line's first import) stays free of torch
    if name == "adapt":
        from distmeta.adaptation import adapt

        return adapt
    raise AttributeError(f"module 'distmeta' has no attribute {name!r}")
