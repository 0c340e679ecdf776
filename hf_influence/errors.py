"""The library's one exception family: every error it raises about the user's input, options or files is an
`HFInfluenceError` (each subclass also keeps the builtin type it always had, e.g. ValueError), so a caller can
catch them all, and the CLI prints them as one line and exits with code 2 (a traceback with --debug)."""


class HFInfluenceError(Exception):
    """Base class of hf-influence's errors about inputs, options, stores and artifacts."""
