"""The single exception type of the conversion tool: one clear line for the user, no traceback."""


class UpcycleError(ValueError):
    """A user error (bad option, bad source, bad output path). The CLI prints `error: <message>` and exits 2."""
