"""User-facing errors.

A person running the pipeline should see one line that names what is wrong and where (file, block, key,
field), never a traceback. Code raises `ConnectomeError` (or a subclass) for anything caused by input,
configuration or environment; the CLI turns it into ``error: <message>`` and exit status 2. Bugs stay
ordinary exceptions so they keep their tracebacks.
"""

from __future__ import annotations


class ConnectomeError(Exception):
    """Bad input, bad configuration or a missing resource, explained in one line."""


class ConfigError(ConnectomeError):
    """A configuration field has an invalid value; the message names the field and the value."""


class VolumeError(ConnectomeError):
    """A volume cannot be opened, read or written as asked (missing path, dtype, box, corrupt chunk)."""


class LedgerError(ConnectomeError):
    """A stage ledger does not match the run it is asked to resume."""


class QueryError(ConnectomeError):
    """A query names an unknown id, version or filter."""
