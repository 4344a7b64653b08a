"""The one base class of every error a user can fix.

A stage raises a subclass of `UserError` when the input, the recipe, a server or a file on disk is wrong in a way
the user can correct; its message says what is wrong, where (file:line and field where there is one) and what to
do. The CLI catches this class only and prints its message on one line: anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Something the user can fix; the message is the whole explanation."""
