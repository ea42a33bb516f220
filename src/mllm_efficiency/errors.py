"""Exceptions raised for bad input. Every message names the parameter and what is allowed."""


class ConfigError(ValueError):
    """A method parameter is outside its allowed range or unknown."""


class UnsupportedModelError(TypeError):
    """The model family has no adapter."""


class UnsupportedMethodError(UnsupportedModelError, NotImplementedError):
    """The model family has an adapter, but this method cannot run on it (the message names the model, the
    method and the reason). Raised by `apply` before anything is attached."""


class NoVisualTokensError(ValueError):
    """A visual-token method was run on a prompt without image or video tokens."""
