"""A private Mosquitto broker for one run: free loopback port, generated passwords, the shipped ACL.

Tests and the default simulation start their own broker so that they neither depend on
nor disturb a shared one. The configuration comes from the repository's `broker/` folder
(or the copy packaged beside this module); only the placeholders are filled in here.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from fedhlm.transport.address import BrokerAddress
from fedhlm.transport.topics import validate_id

log = logging.getLogger(__name__)

ROLES = ("client", "edge", "cloud", "llm", "admin", "bridge")
_PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for the $7$ (PBKDF2-SHA512) format


def config_dir() -> Path:
    """The folder holding mosquitto.conf, acl, acl-roles.template and bridge.conf."""
    env = os.environ.get("FEDHLM_BROKER_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[3] / "broker", Path.cwd() / "broker"]
    for path in candidates:
        if (path / "mosquitto.conf").is_file():
            return path
    raise FileNotFoundError(
        "broker configuration not found; tried " + ", ".join(str(p) for p in candidates)
        + " (set FEDHLM_BROKER_DIR to the folder holding mosquitto.conf)"
    )


def find_mosquitto() -> str:
    """The mosquitto binary, or a clear error saying how to install it."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if not found:
        raise FileNotFoundError(
            "the 'mosquitto' broker binary is missing: install it with `apt-get install mosquitto` "
            "or `conda install -c conda-forge mosquitto` (scripts/bootstrap.sh does this as root)"
        )
    return found


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto 2's `$7$` password-file hash (PBKDF2-SHA512), so that no subprocess is needed per user."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def validate_user_id(user_id: str) -> str:
    """A role id doubles as MQTT username, client id and topic level: a topic id that also fits the password file."""
    try:
        validate_id(user_id, "role id")
    except ValueError as exc:
        raise ValueError(f"invalid {exc}") from None
    if ":" in user_id or any(c.isspace() for c in user_id):
        raise ValueError(f"invalid role id {user_id!r}: no ':' or whitespace (password file syntax)")
    return user_id


# the pattern lines that let every client read and write every cluster's peer queries; with a known
# client -> edge assignment they give way to one [client] section per client, for its own edge only
OPEN_P2P_PATTERNS = ("pattern write fedhlm/v1/edge/+/p2p/query", "pattern read fedhlm/v1/edge/+/p2p/query",
                     "pattern write fedhlm/v1/edge/+/resolve", "pattern write fedhlm/v1/edge/+/session/resolve")


class BridgeSite(NamedTuple):
    """An edge site as its bridge sees it: the site's edge and the clients that connect there."""

    edge: str
    clients: tuple[str, ...]


class BridgeLink(NamedTuple):
    """What a site broker needs to bridge itself to the cloud broker (`broker/bridge.conf`)."""

    user: str  # the bridge's account on the cloud broker, also its client id there
    password: str
    cloud_host: str
    cloud_port: int
    site: BridgeSite
    keepalive_s: int = 10


def fill(lines: list[str], values: Mapping[str, str], clients: tuple[str, ...] = ()) -> list[str]:
    """Template lines with their {placeholders} filled; a line holding {client} once per client."""
    out = []
    for line in lines:
        for client in (clients if "{client}" in line else (None,)):
            text = line if client is None else line.replace("{client}", client)
            for key, value in values.items():
                text = text.replace("{" + key + "}", value)
            out.append(text)
    return out


def render_bridge(link: BridgeLink, template_dir: Path) -> str:
    """The `connection` section of a site broker's configuration (`broker/bridge.conf`, filled)."""
    lines = (template_dir / "bridge.conf").read_text().splitlines()
    values = {"bridge_user": link.user, "bridge_password": link.password, "cloud_host": link.cloud_host,
              "cloud_port": str(link.cloud_port), "edge": link.site.edge, "keepalive_s": str(link.keepalive_s)}
    return "\n".join(fill(lines, values, link.site.clients)) + "\n"


def render_acl(users: Mapping[str, str], template_dir: Path, clusters: Mapping[str, str] | None = None,
               bridges: Mapping[str, BridgeSite] | None = None) -> str:
    """The shipped `acl` patterns plus one `user` section per server-side role of the run, and, given the
    clusters (client -> edge), one per client confining its peer queries to its own edge's topic; a bridge
    user (on a cloud broker) gets what its site (`bridges`) may carry."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (template_dir / "acl-roles.template").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], [])
        elif stripped and not stripped.startswith("#") and current is not None:
            current.append(stripped)
    base = (template_dir / "acl").read_text().rstrip().splitlines()
    if clusters:
        base = [line for line in base if line.strip() not in OPEN_P2P_PATTERNS]
    parts = [*base, ""]
    for user_id, role in users.items():
        if role == "client":
            if clusters and user_id in clusters:
                parts += [line.replace("{id}", user_id).replace("{edge}", clusters[user_id])
                          for line in sections["client"]] + [""]
            continue  # otherwise clients are covered by the pattern lines
        if role == "bridge":
            site = (bridges or {}).get(user_id)
            if site is None:
                raise ValueError(f"bridge user {user_id!r}: no site given (bridges=...)")
            parts += fill(sections["bridge"], {"id": user_id, "edge": site.edge}, site.clients) + [""]
            continue
        parts += [line.replace("{id}", user_id) for line in sections[role]] + [""]
    return "\n".join(parts)


class TLSFiles(NamedTuple):
    """PEM files of a TLS listener: the broker's certificate and key, and the CA that signed it."""

    certfile: Path
    keyfile: Path
    cafile: Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalBroker:
    """A private Mosquitto on a free loopback port, stopped and cleaned up on exit (also on error).

    `users` maps each role id of the run to its role; passwords are generated here and
    handed out through `address(user_id)`. `stop()`/`start()` restart the same broker on the
    same port with the same persistence directory, which is how restarts are tested.
    `tls=(certfile, keyfile, cafile)` adds a TLS listener (`broker/tls.conf`) on `tls_port`;
    `address(user_id, tls=True)` points a role at it. `clusters` (client -> edge) confines each
    client's peer queries to its own edge's topic; without it any client may read any cluster's.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        run_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        passwords: Mapping[str, str] | None = None,
        startup_timeout_s: float = 10.0,
        tls: TLSFiles | tuple[str | Path, str | Path, str | Path] | None = None,
        tls_port: int | None = None,
        clusters: Mapping[str, str] | None = None,
        username_as_client_id: bool = True,
        bridges: Mapping[str, BridgeSite] | None = None,
        bridge_to: BridgeLink | None = None,
    ) -> None:
        users = dict(users or {"admin": "admin"})
        # False: several connections may share one account under their own client ids (how a user's own broker
        # may be set up for `--broker` with one account for every role); True binds each account to one session
        self.username_as_client_id = username_as_client_id
        self.clusters = dict(clusters or {})  # client -> edge: peer queries confined to the client's cluster
        self.bridges = dict(bridges or {})  # bridge user -> the site it carries (a cloud broker)
        self.bridge_to = bridge_to  # this is a site broker, bridged to a cloud broker
        unknown = sorted(c for c in self.clusters if users.get(c) != "client")
        if unknown:
            raise ValueError(f"clusters name {unknown[0]!r}, which is not a client user of this broker")
        for user_id, role in users.items():
            validate_user_id(user_id)
            if role not in ROLES:
                raise ValueError(f"user {user_id!r}: role must be one of {ROLES}, got {role!r}")
        self.users = users
        self.host = host
        self.port = port or free_port(host)
        self.tls = TLSFiles(*(Path(f).resolve() for f in tls)) if tls is not None else None
        if self.tls is not None:
            for name, path in self.tls._asdict().items():
                if not path.is_file():
                    raise FileNotFoundError(f"tls {name}: {path} is not a file")
        self.tls_port = (tls_port or free_port(host)) if self.tls is not None else None
        self._passwords = {u: (passwords or {}).get(u) or secrets.token_urlsafe(18) for u in users}
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="fedhlm-broker-"))
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._binary = find_mosquitto()
        self._write_files()

    # -- files -----------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.run_dir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "mosquitto.log"

    def _write_files(self) -> None:
        template_dir = config_dir()
        persistence = self.run_dir / "persistence"
        persistence.mkdir(parents=True, exist_ok=True)
        password_file = self.run_dir / "passwd"
        acl_file = self.run_dir / "acl"
        password_file.write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in self._passwords.items()))
        acl_file.write_text(render_acl(self.users, template_dir, self.clusters, self.bridges))
        for path in (password_file, acl_file):
            path.chmod(0o600)
        values = {
            "port": str(self.port),
            "host": self.host,
            "password_file": str(password_file),
            "acl_file": str(acl_file),
            "persistence_dir": str(persistence),
            "log_file": str(self.log_file),
            "user": getpass.getuser(),
        }
        text = (template_dir / "mosquitto.conf").read_text()
        if not self.username_as_client_id:
            text = text.replace("use_username_as_clientid true", "use_username_as_clientid false")
        if self.tls is not None:
            text = text.rstrip() + "\n\n" + (template_dir / "tls.conf").read_text()
            values |= {"tls_port": str(self.tls_port), **{k: str(v) for k, v in self.tls._asdict().items()}}
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        if self.bridge_to is not None:  # after the placeholders: the bridge section has its own
            text = text.rstrip() + "\n\n" + render_bridge(self.bridge_to, template_dir)
        self.config_file.write_text(text)
        self.config_file.chmod(0o600)  # a site's configuration holds its bridge's password

    # -- process ---------------------------------------------------------------
    def start(self) -> "LocalBroker":
        if self.running:
            return self
        self._proc = subprocess.Popen(
            [self._binary, "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start-up: {err.strip()} {tail.strip()}")
            try:
                for port in (self.port, self.tls_port):
                    if port is not None:
                        with socket.create_connection((self.host, port), timeout=0.2):
                            pass
                log.info("private broker up at %s (run dir %s)", self.url, self.run_dir)
                return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"mosquitto did not accept connections on {self.host}:{self.port} "
                           f"within {self.startup_timeout_s} s; see {self.log_file}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Polite stop: SIGTERM lets Mosquitto save its persistence file."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_pipes()

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), as a crash or power cut would do it."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_pipes()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _close_pipes(self) -> None:
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cleanup(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "LocalBroker":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def address(self, user_id: str, tls: bool = False) -> BrokerAddress:
        """Host, port and the credentials of one role of the run (on the TLS listener with `tls=True`)."""
        if user_id not in self._passwords:
            raise KeyError(f"no broker user {user_id!r}; known: {sorted(self._passwords)[:10]}...")
        if not tls:
            return BrokerAddress(self.host, self.port, user_id, self._passwords[user_id])
        if self.tls is None or self.tls_port is None:
            raise ValueError("this broker has no TLS listener: pass tls=(certfile, keyfile, cafile)")
        return BrokerAddress(self.host, self.tls_port, user_id, self._passwords[user_id], tls=True,
                             ca_certs=str(self.tls.cafile))
