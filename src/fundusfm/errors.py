"""The errors fundusfm raises on purpose, one family, so a caller can tell what went wrong.

Every one derives from `FundusError`; the command line turns each into one `error:` line
(exit 2) that says what to do. They also derive from the built-in error they refine
(`ValueError`, `FileNotFoundError`, `OSError`, `RuntimeError`), so code that caught those
before keeps working.

    ConfigError        a setting, config file or command-line value that cannot be used
    DataError          input data: a manifest, label table, splits file, image or mask
    ImageDecodeError   (DataError) an image file that cannot be read as a photograph
    NoFieldOfView      (ImageDecodeError) an image with no field of view to crop to
    WeightsError       weights or a bundle that are missing, refused or do not fit
    WeightsNotFound    (WeightsError, FileNotFoundError) weights not on this machine
    BundleError        (WeightsError) a bundle folder that is incomplete or altered
    PickleRefused      (WeightsError) a checkpoint that would run pickled code to load
    TrainingDiverged   a loss that became NaN or infinite (the last good checkpoint is kept)
    CheckpointWriteError  (OSError) a checkpoint or weights file that could not be written
"""

from __future__ import annotations


class FundusError(Exception):
    """Base of every error fundusfm raises on purpose."""


class ConfigError(FundusError, ValueError):
    """A configuration file, override or option value that cannot be used as given."""


class DataError(FundusError, ValueError):
    """Input data that cannot be used: the message names the file, row or value."""


class ImageDecodeError(DataError):
    """An image file that cannot be decoded (missing, truncated, not an image, too large)."""


class NoFieldOfView(ImageDecodeError):
    """An image in which no field of view can be found (blank, or all background)."""


class WeightsError(FundusError, ValueError):
    """Weights or a bundle that are missing, refused, or do not fit the model asked for."""


class WeightsNotFound(WeightsError, FileNotFoundError):
    """Weights that are not on this machine (fundusfm never downloads them by itself)."""


class BundleError(WeightsError):
    """A bundle folder that is incomplete, of an unknown format, or altered since written."""


class PickleRefused(WeightsError):
    """A checkpoint that holds pickled objects, refused unless the user trusts its source."""


class TrainingDiverged(FundusError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointWriteError(FundusError, OSError):
    """A checkpoint or weights file could not be written (disk full, quota, permissions)."""
