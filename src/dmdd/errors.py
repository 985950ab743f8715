"""Exceptions a user can cause. The CLI prints their message as one line and exits non-zero."""


class DmddError(Exception):
    """Base class: a problem with the user's input, data, files or configuration."""


class ConfigError(DmddError):
    """An invalid option or configuration file."""


class DatasetError(DmddError):
    """A dataset folder is missing, empty or in an unknown layout, or a mask is missing / wrong."""


class ImageReadError(DmddError):
    """An image file cannot be decoded."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}; replace or remove the file")
        self.path = path
        self.reason = reason


class ImageTooLargeError(ImageReadError):
    """An image with more pixels than a set limit (read from its header, before decoding)."""


class BackboneError(DmddError):
    """An unknown backbone name, unavailable weights, or a weights file for another architecture."""


class CheckpointError(DmddError):
    """A checkpoint is truncated, from another model or version, or not a dmdd checkpoint."""


class TrainingDivergedError(DmddError):
    """A loss became NaN or infinite."""
