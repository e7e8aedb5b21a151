"""Exception and warning classes shared by every fmadapt subpackage."""


class FmadaptWarning(UserWarning):
    """Warning for input that is legal but probably not what the user intended."""


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model."""


class RecipeError(ValueError):
    """A recipe key or value is invalid."""


class DataError(ValueError):
    """A dataset folder, image or label file is missing or malformed."""
