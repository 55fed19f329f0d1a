"""Errors the engine raises for bad input; every message names the problem and the limit."""


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or malformed."""


class UnsupportedModelError(ValueError):
    """The model's architecture or a config feature is not implemented."""


class InvalidRequestError(ValueError):
    """A request (prompt or sampling values) is outside what the model accepts."""
