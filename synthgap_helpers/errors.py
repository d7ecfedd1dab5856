"""The errors of unusable data: each message names the file, folder or address and the fix.

They live apart from the modules that raise them so that `data` and `downloads` need not import each other.
"""


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file or folder and the fix."""


class DownloadError(DataError):
    """A download that failed or did not match its checksum; the message names the URL, the cache folder and the fix."""


class ChecksumError(DownloadError):
    """A download that arrived whole but with another checksum than expected (it was deleted)."""
