"""Two-stage offline image features: frozen CNN taps cached to HDF5, then PCA and small heads."""

__version__ = "0.1.0"
__all__ = ["load_features"]


def __getattr__(name):
    """`from pipeline import load_features`, imported on first use: the CLI starts without h5py."""
    if name == "load_features":
        from pipeline.features import load_features

        return load_features
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
