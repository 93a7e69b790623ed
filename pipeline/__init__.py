"""Two-stage offline image features: frozen CNN taps cached to HDF5, then PCA and small heads."""

__version__ = "0.1.0"
