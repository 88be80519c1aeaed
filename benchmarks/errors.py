"""The one error type a user can cause.

Anything a user can get wrong (a missing folder, an unknown method, a malformed override, an unsafe
checkpoint) raises `UserError` with one line naming the thing and the fix. The CLI turns it into
that line on stderr and exit code 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and how to fix it."""

    exit_code = 2
