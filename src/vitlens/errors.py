"""The one exception type users see."""


class VitlensError(ValueError):
    """A user-facing problem with one clear line saying what is wrong and how to fix it."""
