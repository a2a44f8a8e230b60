"""The one exception type a user can cause; `__main__` turns it into a single line and exit 2."""


class PipelineError(Exception):
    """A problem the user can fix: bad params, bad data, unreachable server.

    The message names the thing that is wrong and how to fix it.
    """
