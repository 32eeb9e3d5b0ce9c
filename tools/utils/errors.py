"""The one exception type that tools turn into a clean `error: ...` line."""


class UserError(ValueError):
    """A mistake the user can fix (bad config, missing file, wrong key).

    The message is a single line that names the file and the key or path at
    fault, so the tools can print it without a traceback and exit with code 2.
    Anything else that escapes a tool is a bug and keeps its traceback.
    """

    def __init__(self, message: str):
        # Tools print exactly one line; collapse stray newlines from wrapped
        # library messages so that promise holds.
        lines = [line.strip() for line in str(message).splitlines()]
        super().__init__(" ".join(line for line in lines if line))


class DistributedError(Exception):
    """A data-parallel run cannot go on: a peer rank died, hung or disagrees.

    Printed like a UserError (one `error:` line naming the rank), with its
    own exit code, so a job's logs say which rank gave up and why.
    """

    def __init__(self, message: str):
        lines = [line.strip() for line in str(message).splitlines()]
        super().__init__(" ".join(line for line in lines if line))


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (kill, a scheduler, a container stop): unwinds like Ctrl-C, so saves stay atomic."""


# Exit codes shared by every tool (documented in doc/tools.md).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_DISTRIBUTED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what shells report for a process it ended
