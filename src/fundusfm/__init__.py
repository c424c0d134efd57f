"""fundusfm: disease-specific foundation models for retinal fundus photographs."""

__version__ = "0.1.0"


def load_bundle(path, device: str = "cpu"):
    """Load a model bundle for prediction (see `fundusfm.bundle`)."""
    from fundusfm.models.loaded import load_bundle as _load

    return _load(path, device)
