"""The one exception type for bad input a user can fix.

The CLI prints its message as one paragraph and exits with code 2 (no traceback); anything else
escaping to the CLI is an internal error (exit 1).
"""


class PhotosimError(Exception):
    """Bad input: a wrong flag, config key, unsupported layer, corrupt file or missing dataset.

    The message names the culprit and the fix.
    """
