"""The project's input-error types: what `symeq` reports as one line and exit code 2.

Anything else that goes wrong is a bug and keeps its traceback. Raise these only for bad user input
(a config key, a CLI argument, a shard set, a checkpoint), with a message that names the fix.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the fix."""


class MissingInput(InputError, FileNotFoundError):
    """A file or directory that the user named, or that the run needs, does not exist; the message names the fix."""
