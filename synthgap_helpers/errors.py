"""Expected failures: each message names the file, folder, parameter or address and the fix.

They live apart from the modules that raise them so that `data` and `downloads` need not import each other,
and so that the command line can recognise the failures of any stage without importing the stage packages.
"""


INTERRUPTED = "interrupted; rerun the same command to resume"  # what a command prints when Ctrl-C or SIGTERM stops it


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system preempting the job, `kill`): stops the command the way Ctrl-C does, so that the same
    cleanup runs (temporary files removed, partial manifest appends taken back)."""


class UserError(Exception):
    """An expected failure whose message says what to fix; the CLI prints it in one line and exits 2.

    Inherit from it (besides the built-in class a caller may catch, such as ValueError) for every failure
    that a user causes and can fix: bad data, parameters, files or folders. Bugs must not inherit from it:
    the CLI lets every other exception through with its traceback.
    """


class DataError(ValueError, UserError):
    """Data that cannot be used as given; the message names the file or folder and the fix."""


class DownloadError(DataError):
    """A download that failed or did not match its checksum; the message names the URL, the cache folder and the fix."""


class ChecksumError(DownloadError):
    """A download that arrived whole but with another checksum than expected (it was deleted)."""


class WriteFailed(UserError):
    """A file that could not be written whole (no space, file-size limit, read-only file system, permissions); the
    message names the final path (never a temporary one), the system's reason and the fix for that reason."""

    def __init__(self, path: object, cause: OSError, fix: str):
        self.path, self.errno = path, cause.errno
        super().__init__(f"could not write {path}: {cause.strerror or cause}; {fix}; then rerun the same command "
                         "(finished work is kept)")
