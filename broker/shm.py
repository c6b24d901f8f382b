"""Same-host transport: the pixels stay in a shared-memory ring, zmq carries headers.

Over tcp/ipc every frame is copied through the kernel (zmq tops out around 2.5-3.5
GB/s on these machines). With ``serve --shm`` the broker captures straight into the
slots of a ring in a file under ``/dev/shm`` and tells same-host consumers only
which slot holds which frame (an SHM_FRAME header, see ``protocol.py`` and
docs/protocol.md). The layout of the file is defined in ``protocol.py``; this module
maps it.

* **Seqlock**: the writer stores a slot's begin stamp before the pixels and its end
  stamp after; a reader trusts a slot only if both equal the header's stamp before
  it reads, and the begin stamp still does after (``intact``). This relies on x86's
  store order (TSO), the only platform these machines have.
* **Lifetimes**: the broker holds an exclusive ``flock`` on the ring for as long as
  it lives; the kernel drops it when the process dies, even by SIGKILL. The next
  broker of the same stream removes every ring of that stream whose lock it can
  take (``remove_stale``). Readers only map the file, never lock or unlink it, so a
  consumer that dies leaks nothing.
* **Page faults**: both sides map with MAP_POPULATE, so the hot path never faults
  (a first touch costs about 2.7 us per 4 KiB page here).
"""
from __future__ import annotations

import fcntl
import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol as proto

SHM_DIR = Path("/dev/shm")
PREFIX = "framebroker-"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(slots|gib|mib|kib|gb|mb|kb|b)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}
MIN_SLOTS = 2
#: kernel buffer of the header sockets (bytes): about 30 headers, not thousands
SHM_SOCKET_BUFFER = 4096


def shm_queue(hwm: int, nslots: int) -> int:
    """The HWM for a header socket: at most half the ring, so that a header still queued
    at each end names a slot that is not about to be reused."""
    return max(1, min(hwm, nslots // 2))


class FrameOverwritten(RuntimeError):
    """The broker reused the frame's slot before (or while) it was read: a drop."""


def boot_id() -> str:
    """This kernel's boot id: a ring is the same memory only on the same boot of the host."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def safe_name(stream: str) -> str:
    """The stream name as a file-name fragment: [A-Za-z0-9_.-], at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stream)[:64]


def ring_path(stream: str, session: int) -> Path:
    return SHM_DIR / f"{PREFIX}{safe_name(stream)}-{session:016x}"


def pub_endpoint(stream: str, session: int) -> str:
    """The header-only PUB endpoint: a Linux abstract ipc socket (no file to leak, and
    unreachable from other hosts, so tcp subscribers never see SHM_FRAME messages)."""
    return f"ipc://@{PREFIX}{safe_name(stream)}-{session:016x}"


def parse_size(text: str) -> tuple[str, float]:
    """``64slots`` -> ("slots", 64); ``1GiB`` / ``512MiB`` / ``2GB`` / ``1000000`` -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"ring size {text!r} must be a slot count like '64slots' or a size "
                         f"like '1GiB', '512MiB', '2GB'")
    value, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit == "slots":
        if value != int(value):
            raise ValueError(f"slot count {text!r} must be a whole number")
        return "slots", value
    return "bytes", value * _UNITS[unit]


def ring_slots(text: str, frame_bytes: int) -> int:
    """How many slots ``--shm TEXT`` gives frames of ``frame_bytes`` bytes."""
    kind, value = parse_size(text)
    stride = proto.ring_slot_stride(frame_bytes)
    n = int(value) if kind == "slots" else int((value - proto.RING_HEADER_BYTES) // stride)
    if not MIN_SLOTS <= n <= proto.MAX_RING_SLOTS:
        raise ValueError(f"--shm {text}: {n} slots of {stride} bytes; need "
                         f"{MIN_SLOTS}-{proto.MAX_RING_SLOTS}")
    return n


def remove_stale(stream: str | None = None) -> list[Path]:
    """Unlink rings (of ``stream``, or of every stream) whose owner is gone: their
    owner's flock is free. Returns what was removed."""
    pattern = f"{PREFIX}{safe_name(stream)}-*" if stream is not None else f"{PREFIX}*"
    removed = []
    # ".NAME.new": a ring whose broker died while creating it, before the rename
    for path in [*SHM_DIR.glob(pattern), *SHM_DIR.glob(f".{pattern}.new")]:
        if not path.is_file():  # e.g. another program's directory of that name
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live broker owns it
        finally:
            os.close(fd)  # also releases our lock
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _slot_views(mm: mmap.mmap, info: proto.RingInfo) -> tuple[np.ndarray, list[np.ndarray]]:
    """(slot headers as an (nslots, 4) u64 array, one pixel array per slot), all views."""
    n, stride = info.nslots, info.slot_stride
    heads = np.ndarray((n, 4), dtype="<u8", buffer=mm, offset=info.data_offset,
                       strides=(stride, 8))
    pixels = [np.ndarray(info.shape, dtype=info.dtype, buffer=mm,
                         offset=info.data_offset + i * stride + proto.SLOT_HEADER_BYTES)
              for i in range(n)]
    return heads, pixels


class Ring:
    """The broker's side: creates, prefaults, locks and finally unlinks the ring."""

    def __init__(self, stream: str, session: int, shape: tuple[int, ...], dtype: np.dtype,
                 nslots: int) -> None:
        self.removed_stale = remove_stale(stream)
        self.info = proto.RingInfo(nslots, proto.ring_slot_stride(
            int(np.prod(shape)) * np.dtype(dtype).itemsize), session, os.getpid(),
            np.dtype(dtype), tuple(shape), boot_id())
        self.path = ring_path(stream, session)
        tmp = self.path.with_name("." + self.path.name + ".new")  # not matched by the glob
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.ftruncate(self.fd, self.info.file_size)
            self.mm = mmap.mmap(self.fd, self.info.file_size,
                                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            self.mm[:proto.RING_HEADER_BYTES] = proto.encode_ring_header(self.info).ljust(
                proto.RING_HEADER_BYTES, b"\0")
            os.rename(tmp, self.path)  # published only once locked and complete
        except BaseException:
            os.close(self.fd)
            tmp.unlink(missing_ok=True)
            raise
        self.heads, self.pixels = _slot_views(self.mm, self.info)
        st = os.fstat(self.fd)
        self.inode, self.device = st.st_ino, st.st_dev

    def begin(self, slot: int, stamp: int, frame_id: int) -> None:
        """Mark ``slot`` as being written for ``stamp`` (before any pixel changes)."""
        head = self.heads[slot]
        head[0] = stamp
        head[2] = frame_id

    def end(self, slot: int, stamp: int, timestamp_ns: int) -> None:
        """The pixels of ``slot`` are complete: readers may trust it under ``stamp``."""
        head = self.heads[slot]
        head[3] = timestamp_ns
        head[1] = stamp

    def advert(self, pub: str) -> dict[str, Any]:
        """What a client needs to decide whether it can map this ring (endpoints reply)."""
        return {"path": str(self.path), "pub": pub, "boot_id": self.info.boot_id,
                "inode": self.inode, "device": self.device, "slots": self.info.nslots,
                "slot_bytes": self.info.slot_stride, "session": self.info.session,
                "owner_pid": self.info.owner_pid}

    def close(self) -> None:
        """Unlink the ring. The mapping itself lives until the object is collected: libzmq
        may still be sending zero-copy messages that point into it."""
        self.path.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RingReader:
    """A consumer's read-only mapping, opened only after the advert checks out."""

    def __init__(self, advert: dict[str, Any]) -> None:
        path = Path(str(advert.get("path", "")))
        if path.parent != SHM_DIR or not path.name.startswith(PREFIX):
            raise proto.BadRing(f"ring path {str(path)!r} is not a {SHM_DIR}/{PREFIX}* file")
        if advert.get("boot_id") != boot_id():
            raise proto.BadRing("the ring is on another host (or another boot of this one)")
        fd = os.open(path, os.O_RDONLY)  # FileNotFoundError: another host
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_dev) != (advert.get("inode"), advert.get("device")):
                raise proto.BadRing(f"{path} is not the broker's ring (inode/device differ)")
            with open(fd, "rb", closefd=False) as f:
                info = proto.decode_ring_header(f.read(proto.RING_HEADER_BYTES), st.st_size)
            if info.session != advert.get("session"):
                raise proto.BadRing(f"{path} belongs to session {info.session:x}, not "
                                    f"{advert.get('session')}")
            self.mm = mmap.mmap(fd, info.file_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.info, self.path = info, path
        self.heads, self.pixels = _slot_views(self.mm, info)

    def view(self, h: proto.Header) -> np.ndarray:
        """The read-only pixels of SHM_FRAME ``h``; raises BadSlot/BadRing for a header
        that does not fit this ring, FrameOverwritten if the slot no longer holds it."""
        info = self.info
        if not 0 <= h.slot < info.nslots:
            raise proto.BadSlot(f"slot {h.slot} is out of range (ring has {info.nslots})")
        if h.shape != info.shape or h.dtype != info.dtype or h.session != info.session:
            raise proto.BadRing(f"frame {h.shape} {h.dtype} session {h.session:x} does not "
                                f"match the ring's {info.shape} {info.dtype} "
                                f"{info.session:x}")
        head = self.heads[h.slot]
        if head[1] != h.stamp or head[0] != h.stamp:
            raise FrameOverwritten(f"slot {h.slot} no longer holds frame {h.frame_id}")
        return self.pixels[h.slot]

    def intact(self, slot: int, stamp: int) -> bool:
        """The seqlock's second check: no writer has started on ``slot`` since ``stamp``."""
        return bool(self.heads[slot, 0] == stamp)
