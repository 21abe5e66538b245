"""A small on-disk outbox for QoS 1 updates, so that an update survives a power cut.

An update is written (atomically, fsync'd) before it is published and removed once the
broker's PUBACK came back; whatever is still there at start is resent. The edge counts a
repeated update for a round once, so a resend after an ack that was lost with the power is
harmless. Entries are MessagePack maps {"topic", "payload"} with the codec's wire bytes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from fedhlm.transport.codec import DecodeError, decode, payload_type
from fedhlm.transport.messages import Message

log = logging.getLogger(__name__)
SUFFIX = ".msgpack"


@dataclass(frozen=True)
class Entry:
    path: Path
    topic: str
    message: Message


class Outbox:
    """One file per unacknowledged update in `folder`, oldest first."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._counter = 0

    def put(self, topic: str, payload: bytes) -> Path:
        """Persist one encoded message for `topic` before it is sent."""
        self._counter += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._counter:06d}"
        final = self.folder / (name + SUFFIX)
        staging = self.folder / (name + ".tmp")
        with open(staging, "wb") as fh:
            fh.write(msgpack.packb({"topic": topic, "payload": bytes(payload)}, use_bin_type=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(staging, final)
        _fsync_dir(self.folder)
        return final

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        _fsync_dir(self.folder)

    def pending(self) -> list[Entry]:
        """Entries still to send; a file that does not decode is dropped with a logged reason."""
        out = []
        for path in sorted(self.folder.glob("*" + SUFFIX)):
            try:
                raw = msgpack.unpackb(path.read_bytes(), raw=False)
                topic, payload = raw["topic"], raw["payload"]
                expected = payload_type(topic)
                if expected is None:
                    raise DecodeError("bad_envelope", f"topic {topic!r} is outside the FedHLM tree")
                out.append(Entry(path, topic, decode(payload, expected)))
            except (DecodeError, KeyError, TypeError, ValueError, msgpack.UnpackException) as err:
                log.warning("outbox: dropping unreadable %s: %s", path, err)
                path.unlink(missing_ok=True)
        for stale in self.folder.glob("*.tmp"):  # a write the power cut interrupted: never published
            stale.unlink(missing_ok=True)
        return out

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*" + SUFFIX))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
