"""The one exception type for data that cannot be trained on (imported by every data module).

`DataError` is a ValueError: the data (or their setting, `data.*`) are wrong, not the program. Its message is one
line that names the key (data.path, data.max_bad_fraction, ...) and what to do; a command line prints it as is.
`DataPathError` (data.path names nothing: no directory, no shard file) is a DataError that is also a
FileNotFoundError, for callers that catch missing files.
"""
from __future__ import annotations


class DataError(ValueError):
    """The data are unusable: data.path empty or missing, nothing readable, data.max_bad_fraction exceeded, or a
    checkpoint's data position that does not fit this run."""


class DataPathError(DataError, FileNotFoundError):
    """data.path (or a shard it names) does not exist."""


def worker_message(exc: BaseException) -> str:
    """The original one-line message of a DataError re-raised by a torch DataLoader worker (torch puts the worker's
    traceback in the message: "Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...")."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.endswith("Error") else last
