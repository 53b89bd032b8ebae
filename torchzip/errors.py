"""Named exceptions for errors a user can cause.

Every one subclasses ``ValueError`` so ``except ValueError`` keeps working, and every message says
what was wrong and what is allowed.
"""


class TorchzipError(ValueError):
    """Base class of every error torchzip raises on bad user input."""


class RecipeError(TorchzipError):
    """A recipe (pass names, keys, values or their order) cannot be applied."""


class UnsupportedLayerError(RecipeError):
    """A layer asked for by name cannot take what the recipe asks of it."""


class FormatError(TorchzipError):
    """A ``.tzip`` artifact is malformed, corrupted, or does not match the model skeleton."""


class DistillationError(TorchzipError):
    """A distillation set-up (teacher, features, temperature) cannot work."""


class CalibrationError(TorchzipError):
    """Calibration data is missing, empty, or cannot run through the model."""


class MetaTensorError(TorchzipError):
    """A model runs while some of its tensors are still on the meta device (they have no values):
    tensors a ``.tzip`` file cannot hold, such as non-persistent buffers, on a meta skeleton."""
