"""Start-up checks of what :class:`~telemetry.config.Settings` names but cannot check
by itself, because it reads files: the JWT keyset (``TELEMETRY_JWT_KEYS_FILE`` and the
PEM keys) and the TLS certificate and key.

``telemetry config --check`` and ``telemetry serve`` both run them, so a bad file is
reported before the service opens its storage, as one ``configuration error`` with
exit code 2, never as a traceback from inside the running server. Synchronous; the
files are read once here and again when the server starts.
"""

from __future__ import annotations

from hypercorn.config import Config

from telemetry.auth.keys import KeyStore
from telemetry.config import ConfigError, Settings
from telemetry.tls import TLSConfigError, apply_tls


def preflight(settings: Settings) -> None:
    """Load the keyset and build the TLS context once. Raises :class:`ConfigError`
    naming the setting and the file or kid at fault, never any key material."""
    KeyStore(settings)  # raises KeyStoreError, a ConfigError
    try:
        apply_tls(Config(), settings)  # builds the context when TLS is configured
    except TLSConfigError as exc:
        raise ConfigError(str(exc)) from None
