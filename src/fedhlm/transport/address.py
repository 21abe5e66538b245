"""Where a broker is and who connects to it: parsed from and printed as `mqtt://user:pass@host:port` URLs."""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlsplit

SCHEMES = {"mqtt": False, "mqtts": True}


@dataclass(frozen=True)
class BrokerAddress:
    """One role's way into a broker. `tls` is set by the `mqtts://` scheme."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_certs: str | None = None
    client_id: str | None = None  # MQTT client id; default: the username (roles sharing one account need their own)

    @classmethod
    def from_url(cls, url: str) -> "BrokerAddress":
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"broker URL {redact(url)!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {redact(url)!r}: no host")
        tls = SCHEMES[parts.scheme]
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )

    def with_credentials(self, username: str, password: str) -> "BrokerAddress":
        return replace(self, username=username, password=password)

    def for_role(self, role_id: str) -> "BrokerAddress":
        """The same account under the MQTT client id of one role (a shared broker account, many roles)."""
        return replace(self, client_id=role_id)

    @property
    def url(self) -> str:
        """The URL with the password in it: never log this, log `public_url`."""
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if self.password:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}"

    def unreachable(self, timeout_s: float = 3.0) -> str:
        """Why nothing accepts a TCP connection at this host and port ('' when something does): a check worth
        making before minutes of model loading, not a proof that the broker will take these credentials."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s):
                return ""
        except OSError as exc:
            return exc.strerror or type(exc).__name__

    @property
    def public_url(self) -> str:
        """The URL without credentials, safe for logs and reports."""
        return redact(self.url)

    def __repr__(self) -> str:  # keep passwords out of logs and tracebacks
        return f"BrokerAddress({self.public_url!r}, user={self.username!r})"


def redact(url: str) -> str:
    """Drop the password from a broker URL."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
