"""The one exception type users see: a one-line message that names the file and the fix."""


class UserError(Exception):
    """Bad input from the user (config, files, flags).

    The message is complete and printable as is; command modules print it without a
    traceback and exit with status 2. Several problems may be joined with newlines, one per
    line.
    """
