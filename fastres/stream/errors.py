"""The stream's one error type."""


class StreamError(ValueError):
    """A model, input or state the stream cannot take; the message says which and why."""
