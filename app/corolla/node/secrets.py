"""Secrets in the OS keyring (Keychain, Credential Manager, Secret Service). Where no secure backend
exists, they stay in memory for this run only, and `storage` says so: never plain text on disk."""

from __future__ import annotations

import contextlib
import logging

logger = logging.getLogger(__name__)
SERVICE = "corolla"


class SecretStore:
    def __init__(self):
        self._memory: dict[str, str] = {}
        self._keyring = None
        try:
            import keyring
            from keyring.backends import fail

            backend = keyring.get_keyring()
            insecure = isinstance(backend, fail.Keyring) or "plaintext" in type(backend).__name__.lower()
            if not insecure and getattr(backend, "priority", 0) > 0:
                self._keyring = keyring
        except Exception:  # no keyring package or a broken backend: memory only
            self._keyring = None
        if self._keyring is None:
            logger.warning("no secure keyring on this computer: secrets are kept in memory for this run only")

    @property
    def storage(self) -> str:
        return "keyring" if self._keyring is not None else "memory (no secure keyring on this computer)"

    def get(self, name: str) -> str | None:
        if self._keyring is not None:
            try:
                return self._keyring.get_password(SERVICE, name)
            except Exception:
                logger.warning("keyring read failed", exc_info=True)
        return self._memory.get(name)

    def set(self, name: str, value: str | None) -> None:
        if self._keyring is not None:
            try:
                if value:
                    self._keyring.set_password(SERVICE, name, value)
                else:
                    with contextlib.suppress(Exception):
                        self._keyring.delete_password(SERVICE, name)
                return
            except Exception:
                logger.warning("keyring write failed; keeping %s in memory for this run", name, exc_info=True)
        if value:
            self._memory[name] = value
        else:
            self._memory.pop(name, None)
