"""Who owns a staged slide, and when its staging may be reclaimed: host ids, leases and their heartbeat.

Several machines may tile into one store on a shared filesystem (SLURM array tasks that start at different times).
Each writer stages a slide under `<store>.pathdino/staging/<slide_id>.<host_id>-<pid>.<nonce>/` and keeps a lease
file beside it, `<same name>.lease`, whose modification time a heartbeat thread renews every `LEASE_RENEW_S` while
the slide is written. A run reclaims (deletes) a staging folder only when its owner is provably gone:

- the owner is on this host (same host id) and its process no longer exists, or
- the lease has not been renewed for `LEASE_S` seconds (the owner, on any host, died or hung).

"Now" for the lease is the modification time of a file this run has just touched in the same folder, so the rule
compares two times set by the same (file server's) clock, never two machines' clocks. A writer whose lease was
reclaimed (it hung for longer than `LEASE_S`) notices at commit and fails the slide instead of publishing it.

The host id is a hash of the host name, the kernel's boot id and the PID namespace: two containers on one machine
with their own PID namespaces are two hosts (their pids mean nothing to each other), a rebooted machine a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tiling.fsio import now_iso, pid_alive

LEASE_S = 600.0
"""A staged slide whose lease was not renewed for this long (10 min) is reclaimed by the next run on any host."""
LEASE_RENEW_S = 30.0
"""How often the heartbeat renews this process's leases: 20 renewals fit in one lease, so a slow filesystem or a
busy machine never lets a live writer's lease lapse."""
LEASE_SUFFIX = ".lease"

# <slide_id>.<host_id>-<pid>.<nonce>; slide ids may contain dots, owner and nonce never do
_OWNED = re.compile(r"^(?P<slide>.+)\.(?P<host>[0-9a-f]{12})-(?P<pid>\d+)\.(?P<nonce>[0-9a-f]{8})$")
# earlier versions: <slide_id>.<pid>.<uuid8>, no host
_LEGACY = re.compile(r"^(?P<slide>.+)\.(?P<pid>\d+)\.(?P<nonce>[0-9a-f]{8})$")


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def host_id() -> str:
    """12 hex digits naming this host: host name + boot id + PID namespace (see the module docstring)."""
    boot = _read_text("/proc/sys/kernel/random/boot_id") or f"node-{uuid.getnode():x}"
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return hashlib.sha1(f"{socket.gethostname()}\0{boot}\0{pid_ns}".encode()).hexdigest()[:12]


def staging_name(slide_id: str) -> str:
    """A fresh staging folder name for `slide_id`, owned by this process on this host."""
    return f"{slide_id}.{host_id()}-{os.getpid()}.{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class StagingOwner:
    """What a staging folder's name says about its writer."""

    slide_id: str
    host: str  # "" for names written by earlier versions (no host recorded)
    pid: int


def parse_staging_name(name: str) -> StagingOwner | None:
    """The owner encoded in a staging folder (or lease) name; None for names that are not staging folders."""
    name = name.removesuffix(LEASE_SUFFIX)
    match = _OWNED.match(name)
    if match:
        return StagingOwner(match["slide"], match["host"], int(match["pid"]))
    match = _LEGACY.match(name)
    if match:
        return StagingOwner(match["slide"], "", int(match["pid"]))
    return None


def _newest_mtime(folder: Path) -> float | None:
    """The latest modification time of a staging folder's top levels (where shards land), or None if it is gone."""
    times = []
    for sub in (folder, folder / "tiles", folder / "tiles" / "c"):
        with contextlib.suppress(OSError):
            times.append(sub.stat().st_mtime)
    return max(times) if times else None


def is_reclaimable(folder: Path, *, now: float, lease_s: float = LEASE_S) -> bool:
    """Whether the staging folder `folder` (or its lease) belongs to a writer that is provably gone.

    `now` is the staging area's current time (a file just touched there). Names that are not staging names are
    never reclaimed: a run must never remove what it does not own.
    """
    owner = parse_staging_name(folder.name)
    if owner is None:
        return False
    if owner.host == host_id() and not pid_alive(owner.pid):
        return True
    lease = folder.with_name(folder.name.removesuffix(LEASE_SUFFIX) + LEASE_SUFFIX)
    try:
        renewed = lease.stat().st_mtime
    except OSError:  # no lease (an earlier version's folder, or one being created or removed): its own age counts
        renewed = _newest_mtime(folder.with_name(folder.name.removesuffix(LEASE_SUFFIX)))
        if renewed is None:
            return False
    return now - renewed > lease_s


def staging_clock(staging_root: Path) -> float:
    """The staging area's current time: the modification time of a file touched there now (see module docstring)."""
    probe = staging_root / f".clock.{host_id()}-{os.getpid()}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def write_lease(folder: Path, slide_id: str) -> Path:
    """Create the lease beside the staging folder `folder` (before the folder itself) and have it renewed."""
    lease = folder.with_name(folder.name + LEASE_SUFFIX)
    lease.write_text(
        json.dumps(
            {
                "slide_id": slide_id,
                "host_id": host_id(),
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "started": now_iso(),
                "lease_s": LEASE_S,
                "renew_s": LEASE_RENEW_S,
            }
        )
        + "\n"
    )
    _heartbeat().add(lease)
    return lease


def release_lease(lease: Path) -> None:
    """Stop renewing a lease and delete it (after its folder was published or discarded)."""
    _heartbeat().discard(lease)
    with contextlib.suppress(OSError):
        lease.unlink()


def lease_held(lease: Path) -> bool:
    """Whether this process still holds `lease`: it exists and no renewal found it gone (reclaimed by another run)."""
    return lease.exists() and lease not in _heartbeat().lost


class _Heartbeat:
    """One daemon thread per process renewing every lease this process holds."""

    def __init__(self) -> None:
        self.leases: set[Path] = set()
        self.lost: set[Path] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, lease: Path) -> None:
        with self._lock:
            self.leases.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pathdino-lease-heartbeat", daemon=True)
                self._thread.start()

    def discard(self, lease: Path) -> None:
        with self._lock:
            self.leases.discard(lease)
            self.lost.discard(lease)

    def renew(self) -> None:
        with self._lock:
            leases = list(self.leases)
        for lease in leases:
            try:
                os.utime(lease)
            except FileNotFoundError:
                with self._lock:
                    if lease in self.leases:
                        self.lost.add(lease)
            except OSError:  # a transient filesystem error: the next renewal tries again
                pass

    def _run(self) -> None:
        while not self._wake.wait(LEASE_RENEW_S):
            self.renew()


@lru_cache(maxsize=1)
def _heartbeat() -> _Heartbeat:
    return _Heartbeat()


def renew_leases_now() -> None:
    """Renew every lease this process holds at once (the heartbeat does it every LEASE_RENEW_S)."""
    _heartbeat().renew()
