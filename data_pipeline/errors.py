"""The one exception type for user mistakes: the CLI prints its message, never a traceback."""


class UserError(Exception):
    """A bad input, option or file. The message names the file, key or value at fault."""
