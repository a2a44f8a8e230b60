"""The exceptions `__main__` turns into a single line: PipelineError (exit 2), Terminated (143);
and the password-free forms of a URI and of an error's reason for those lines."""

import urllib.parse


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


def redacted(uri: str) -> str:
    """The URI without its password: it goes into an error line, and CI logs are read by many."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def reason(exc: BaseException, uri: str) -> str:
    """The exception's first line, cut short, without the password of uri (a library's message
    may quote the whole URL)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    password = urllib.parse.urlsplit(uri).password
    if password:
        text = text.replace(password, "***")
    return text if len(text) <= 300 else text[:299] + "…"
