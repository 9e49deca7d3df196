"""Decoded frames handed from ingest to detection through shared memory, when both run on one machine (#14).

A decoded 1080p frame is megabytes. Sent over NATS with mutual TLS it is encrypted by ingest, decrypted and
encrypted again by nats-server and decrypted by detection, through Python's SSL layer: profiling a 25 fps camera
showed that hand-off as the largest cost of ingest and a large one of detection (docs/benchmarks.md). With
``LFR_FRAME_ENCODING=shm`` (the embedded default, where every service runs on one machine) the pixels go into a
ring of slots in a shared-memory file (``/dev/shm``, RAM, mode 0600) and the NATS event carries only where they
are (``FrameEvent.shared``); the event still travels, is authorised and is dropped like any other.

Privacy: a slot is overwritten `slots` frames later (ingest makes rings of about a second of frames, the default
``LFR_FRESHNESS_MS``: a frame is gone from the ring about when detection could no longer use it), and a ring is
zeroed and removed when its source ends, when ingest stops, and at the process's exit. Rings of a process that
died are removed by the next ingest to start (their names carry the owner's pid). The ring's memory is reserved
when it is made (a full ``/dev/shm`` then means frames go on NATS as raw planes instead).

Each slot has a sequence number: the writer clears it, copies the planes, then sets it; the reader checks it
before and after using the pixels, so a frame overwritten meanwhile is refused, never read torn.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

SHM_DIR = Path("/dev/shm")
PREFIX = "lfr-frames-"
NAME = re.compile(r"^lfr-frames-([0-9]{1,10})-[0-9a-f]{16}$")
MAGIC = b"LFRRING1"
HEADER_BYTES = 4096  # magic, slot count, slot size, then one uint64 sequence number per slot
MAX_SLOTS = (HEADER_BYTES - 32) // 8
T = TypeVar("T")


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


@dataclass(frozen=True)
class FrameRef:
    """Where one frame's planes are: ring file name, slot, sequence number, bytes."""

    ring: str
    slot: int
    seq: int
    size: int


class FrameRing:
    """The writer's side: one ring per source, created for its frame size."""

    def __init__(self, slots: int, frame_bytes: int):
        if not 2 <= slots <= MAX_SLOTS:
            raise ValueError(f"a frame ring has 2 to {MAX_SLOTS} slots")
        self.slots, self.frame_bytes = slots, frame_bytes
        self.slot_bytes = -(-frame_bytes // 4096) * 4096
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = SHM_DIR / self.name
        size = HEADER_BYTES + slots * self.slot_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # reserve the memory now: a full /dev/shm is an OSError here, not a SIGBUS at the first write
            os.posix_fallocate(fd, 0, size)
            self._mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        head = np.frombuffer(self._mm, np.uint64, count=4)
        head[1], head[2] = slots, self.slot_bytes
        self._seqs = np.frombuffer(self._mm, np.uint64, count=slots, offset=32)
        self._mm[:8] = MAGIC
        self._seq = 0
        self._lock = threading.Lock()
        self.closed = False
        _OPEN.add(self)

    def put(self, planes: np.ndarray) -> FrameRef:
        """Copy a frame's planes (uint8, `frame_bytes` of them) into the next slot."""
        flat = np.asarray(planes, np.uint8).reshape(-1)
        if flat.size != self.frame_bytes:
            raise ValueError(f"this ring holds frames of {self.frame_bytes} bytes, not {flat.size}")
        with self._lock:
            if self.closed:
                raise ValueError("the frame ring is closed")
            self._seq += 1
            slot = self._seq % self.slots
            self._seqs[slot] = 0  # being written: a reader refuses it
            start = HEADER_BYTES + slot * self.slot_bytes
            np.frombuffer(self._mm, np.uint8, count=flat.size, offset=start)[:] = flat
            self._seqs[slot] = self._seq
            return FrameRef(self.name, slot, self._seq, flat.size)

    def close(self) -> None:
        """Zero every slot, then remove the ring (frames still referenced are refused by readers)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._seqs[:] = 0
            self._mm[HEADER_BYTES:] = bytes(len(self._mm) - HEADER_BYTES)
            del self._seqs
            self._mm.close()
            self.path.unlink(missing_ok=True)
            _OPEN.discard(self)

    def close_later(self, delay_s: float) -> None:
        """Close once the frames still in flight are stale anyway (the source ended; detection may be behind)."""
        timer = threading.Timer(delay_s, self.close)
        timer.daemon = True
        timer.start()


_OPEN: set[FrameRing] = set()  # this process's rings not closed yet


@atexit.register
def close_all() -> None:
    """Close every ring of this process now (service stop, and at exit: no frame outlives its process)."""
    for ring in list(_OPEN):
        ring.close()


def remove_orphans() -> list[str]:
    """Remove the rings of processes that no longer run (a crashed ingest); returns their names."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for p in SHM_DIR.glob(PREFIX + "*"):
        m = NAME.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # its owner runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's process
        try:
            with open(p, "r+b") as f:  # zero before removing: a reader that still maps it reads nothing
                size = os.fstat(f.fileno()).st_size
                if size:
                    with mmap.mmap(f.fileno(), size) as mm:
                        mm[:] = bytes(size)
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


class RingReader:
    """The reader's side (detection): maps rings by name, read-only, and forgets those not used for a while."""

    IDLE_S = 10.0

    def __init__(self):
        self._maps: dict[str, tuple[mmap.mmap, int, int, float]] = {}  # name -> (map, slots, slot bytes, last use)
        self._lock = threading.Lock()

    def _open(self, name: str) -> tuple[mmap.mmap, int, int]:
        if NAME.match(name) is None:
            raise ValueError("not a frame ring name")
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise ValueError("the frame ring belongs to another user")
            if st.st_size < HEADER_BYTES:
                raise ValueError("not a frame ring")
            mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        head = np.frombuffer(mm, np.uint64, count=3)
        slots, slot_bytes = int(head[1]), int(head[2])
        if mm[:8] != MAGIC or not 2 <= slots <= MAX_SLOTS or HEADER_BYTES + slots * slot_bytes > len(mm):
            mm.close()
            raise ValueError("not a frame ring")
        return mm, slots, slot_bytes

    def read(self, ref: FrameRef, use: Callable[[memoryview], T]) -> T | None:
        """`use(planes)` on the frame's planes, or None when the frame is gone (overwritten, or its ring closed or
        removed). Raises ValueError for a reference that cannot be a frame of a ring (bad name, slot or size)."""
        now = time.monotonic()
        with self._lock:
            got = self._maps.get(ref.ring)
            if got is None:
                try:
                    mm, slots, slot_bytes = self._open(ref.ring)
                except FileNotFoundError:
                    return None
                got = self._maps[ref.ring] = (mm, slots, slot_bytes, now)
                self._forget_idle(now)
            mm, slots, slot_bytes, _ = got
            self._maps[ref.ring] = (mm, slots, slot_bytes, now)
        if not 0 <= ref.slot < slots or not 0 < ref.size <= slot_bytes or ref.seq <= 0:
            raise ValueError(f"slot {ref.slot} of {ref.size} bytes is outside the ring")
        try:
            seq = np.frombuffer(mm, np.uint64, count=1, offset=32 + 8 * ref.slot)
            if int(seq[0]) != ref.seq:
                return None
            start = HEADER_BYTES + ref.slot * slot_bytes
            out = use(memoryview(mm)[start: start + ref.size])
            return out if int(seq[0]) == ref.seq else None  # overwritten while in use: refused
        except ValueError:
            if mm.closed:
                return None
            raise

    def _forget_idle(self, now: float) -> None:
        for name, (mm, _, _, last) in list(self._maps.items()):
            if now - last > self.IDLE_S:
                del self._maps[name]
                try:
                    mm.close()
                except BufferError:  # a view is still in use by a reader: left to the garbage collector
                    pass

    def close(self) -> None:
        with self._lock:
            for mm, *_ in self._maps.values():
                try:
                    mm.close()
                except BufferError:
                    pass
            self._maps.clear()
