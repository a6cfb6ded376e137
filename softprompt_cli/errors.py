"""The one exception type the CLI turns into a clean message and exit code 2."""


class UserError(Exception):
    """A problem with what the user gave us (recipe, files, checkpoint), not a bug.

    The message must name the problem and the fix in one paragraph.
    """
