"""The exceptions `__main__` turns into a single line: PipelineError (exit 2), Terminated (143)."""


class PipelineError(Exception):
    """A problem the user can fix: bad params, bad data, unreachable server.

    The message names the thing that is wrong and how to fix it.
    """


class Terminated(KeyboardInterrupt):
    """Raised at the next safe point after a SIGTERM (interrupts.check) so runs end KILLED
    instead of staying RUNNING.

    A KeyboardInterrupt, not an Exception, so it travels the same paths as ^C: no `except
    Exception` on the way (a trial's failure handling, prepare's quarantine) mistakes it for an
    ordinary error.
    """
