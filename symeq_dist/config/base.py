"""What every config section shares: the error type and the check helper. Imports nothing of the package."""

from __future__ import annotations

from symeq_dist.errors import InputError


class ConfigError(InputError):
    """A config key or value is wrong; the message names the key and the fix."""


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError("<key>: <msg>") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
