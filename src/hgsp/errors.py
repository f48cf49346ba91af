"""The one exception type that the command line turns into a clean one-line error."""


class UserError(Exception):
    """Bad input or a missing resource: the message names the problem and the fix.

    The CLI prints ``error: <message>`` and exits with code 2; nothing else is shown,
    because a traceback would bury the one line the user needs.
    """
