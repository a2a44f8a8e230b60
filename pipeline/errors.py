"""The exceptions `__main__` turns into a single line: PipelineError (exit 2), Terminated (143)."""


class PipelineError(Exception):
    """A problem the user can fix: bad params, bad data, unreachable server.

    The message names the thing that is wrong and how to fix it.
    """


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (by tracking.stage_run's handler) so runs end KILLED
    instead of staying RUNNING.

    A KeyboardInterrupt, not an Exception: libraries wrap or swallow Exceptions raised inside
    them (MLflow's SQL store turns one into an MlflowException, so a SIGTERM during a store call
    ended the run FAILED; prepare would have quarantined the image being decoded).
    """
