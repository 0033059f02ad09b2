"""Memory rows addressed by id, held in RAM or in append-only files, read in bounded memory.

Every row a state writes gets a row id (its number in the order rows were written). A `RowSpace` maps ids
to rows [d] for the ranges of ids it holds; each range is a *segment*: a RAM tensor, or a `FileArray` (a file
of fixed-width records). Files are read with positional reads into RAM the caller owns, never memory-mapped,
so that reading every long-term row for a question holds one batch at a time, not the file: the process's
memory does not grow with the session.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    from zlib_ng.zlib_ng import crc32  # zlib's crc32, 6x faster (20 vs 3.2 GB/s here)
except ImportError:  # installed without its dependencies: the same checksum, slower
    from zlib import crc32

GAP_BYTES = 64 << 10  # records closer than this are read through, in one read, rather than sought past
SPAN_BYTES = 4 << 20  # the most one read takes in at a time
SCAN_ROWS = 16384  # rows per batch of a scan
SUM_BLOCK_BYTES = 128 << 10  # bytes per checksummed block of an append-only file


def populated_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor that is cheap to fill: its pages come 2 MB at a time (transparent huge
    pages) when the kernel grants them on request and has enough of them free, or else are all mapped in one
    call (Linux MAP_POPULATE), rather than a page fault per 4 kB when it is first written. A fresh 168 MB
    tensor is filled from another in 58 ms on huge pages, 91 ms populated, 96 ms from torch.empty (one thread,
    here). Huge pages are not asked for when too few are free: the kernel would compact memory to make them,
    synchronously, and an open once took 370-400 ms that way."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if not hasattr(mmap, "MAP_POPULATE") or nbytes < 1 << 20:
        return torch.empty(shape, dtype=dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if huge_pages_on_request() and free_huge_bytes() >= 2 * nbytes:
        pages = mmap.mmap(-1, nbytes, flags=flags)
        pages.madvise(mmap.MADV_HUGEPAGE)
    else:
        pages = mmap.mmap(-1, nbytes, flags=flags | mmap.MAP_POPULATE)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps `pages` alive


THP = Path("/sys/kernel/mm/transparent_hugepage")


@functools.cache
def huge_pages_on_request() -> bool:
    """Whether madvise(MADV_HUGEPAGE) gets a mapping transparent huge pages here (Linux: "always" or "madvise")."""
    try:
        mode = (THP / "enabled").read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and ("[always]" in mode or "[madvise]" in mode)


def free_huge_bytes() -> int:
    """Bytes the kernel holds free in blocks of a huge page or larger; 0 where it does not say."""
    try:
        huge = int((THP / "hpage_pmd_size").read_text())
        return free_block_bytes(Path("/proc/buddyinfo").read_text(), huge, mmap.PAGESIZE)
    except (OSError, ValueError):
        return 0


def free_block_bytes(buddyinfo: str, block: int, page: int) -> int:
    """Free bytes in blocks of at least `block` bytes, from /proc/buddyinfo's text (per zone, the number of
    free blocks of 2^order pages of `page` bytes, order 0 first)."""
    order = (block // page).bit_length() - 1
    free = 0
    for zone in buddyinfo.splitlines():
        counts = [int(c) for c in zone.split()[4:]]  # after "Node 0, zone Normal"
        free += sum(n << (o - order) for o, n in enumerate(counts) if o >= order)
    return free * block


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def coalesce(index: torch.Tensor, record_bytes: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Sort index [m] and group it into spans of records that one read each takes in.

    Returns (order [m], ordered [m], spans): ordered = index[order]; span (lo, hi, first) covers records
    lo..hi-1 and holds ordered[first : the next span's first]. A span starts where the gap to the previous
    record is too wide to read through, or where a read would grow past SPAN_BYTES.
    """
    if bool((index.diff() >= 0).all()):  # already in file order (a whole part read in order): no sort
        order, ordered = torch.arange(index.numel()), index
    else:
        order = index.argsort(stable=True)
        ordered = index[order]
    if ordered.numel() == 0:
        return order, ordered, []
    gap, longest = max(1, GAP_BYTES // record_bytes), max(1, SPAN_BYTES // record_bytes)
    cut = (ordered.diff() > gap) | (ordered[1:] // longest != ordered[:-1] // longest)  # [m - 1]
    firsts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(cut)[:, 0] + 1])  # [S]
    lasts = torch.cat([firsts[1:] - 1, torch.tensor([ordered.numel() - 1])])
    lo, hi = ordered[firsts].tolist(), (ordered[lasts] + 1).tolist()
    return order, ordered, list(zip(lo, hi, firsts.tolist(), strict=True))


class DamagedFile(Exception):
    """A file's bytes do not match the checksum recorded when they were committed."""


def block_sums(data: bytes | memoryview, start: int) -> list[tuple[int, int]]:
    """(end, crc32) of each block of `data`, appended at byte `start` of its file, in SUM_BLOCK_BYTES blocks."""
    view = memoryview(data).cast("B")
    return [
        (start + min(at + SUM_BLOCK_BYTES, view.nbytes), crc32(view[at : at + SUM_BLOCK_BYTES]))
        for at in range(0, view.nbytes, SUM_BLOCK_BYTES)
    ]


@dataclass
class BlockSums:
    """Checksums of a file's committed bytes: block i covers bytes ends[i-1]..ends[i]-1 (block 0 from 0) and
    has crc32 crcs[i]. A read verifies the blocks it touches, each once per process."""

    path: Path
    ends: torch.Tensor  # [B] int64, ascending
    crcs: torch.Tensor  # [B] int64
    hint: str = ""  # what to do about damage
    verified: torch.Tensor = field(init=False)  # [B] bool

    def __post_init__(self) -> None:
        self.verified = torch.zeros(self.ends.numel(), dtype=torch.bool)

    @property
    def covered(self) -> int:
        """Bytes from 0 that the blocks cover."""
        return int(self.ends[-1]) if self.ends.numel() else 0

    def verify(self, fd: int, lo: int, hi: int) -> None:
        """Check the blocks holding bytes lo..hi-1 of the file open as `fd`; raise DamagedFile on a mismatch."""
        if hi > lo:
            self.verify_ranges(fd, torch.tensor([lo]), torch.tensor([hi]))

    def verify_ranges(self, fd: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Check every block holding bytes of the ranges lo[i]..hi[i]-1 (non-empty) at once."""
        if int(hi.max()) > self.covered:
            at = int(hi.argmax())
            raise DamagedFile(
                f"{self.path}: bytes {int(lo[at])}-{int(hi[at])} have no checksum (the file is damaged){self.hint}"
            )
        first = torch.searchsorted(self.ends, lo, right=True)  # [S] the block of each range's first byte
        last = torch.searchsorted(self.ends, hi - 1, right=True)  # [S] ... and of its last byte
        starts = torch.zeros(self.ends.numel() + 1, dtype=torch.int64)
        starts.index_add_(0, first, torch.ones_like(first))
        starts.index_add_(0, last + 1, -torch.ones_like(last))
        touched = starts.cumsum(0)[:-1] > 0  # [B] blocks inside some range
        for block in torch.nonzero(touched & ~self.verified)[:, 0].tolist():
            start, end = int(self.ends[block - 1]) if block else 0, int(self.ends[block])
            if crc32(os.pread(fd, end - start, start)) != int(self.crcs[block]):
                raise DamagedFile(f"{self.path}: bytes {start}-{end} do not match their checksum{self.hint}")
            self.verified[block] = True

    def verify_all(self, length: int) -> None:
        """Check the first `length` bytes (every block up to there)."""
        with _Descriptor(self.path) as fd:
            self.verify(fd, 0, length)


@dataclass(frozen=True)
class FileArray:
    """The first `count` records of `path`, each `width` values of `dtype` (width 0: one scalar per record),
    starting `offset` bytes into the file. Read-only: the file only ever grows past them. With `sums`, every
    read checks the bytes it takes against their checksums first."""

    path: Path
    count: int
    width: int
    dtype: torch.dtype
    offset: int = 0
    sums: BlockSums | None = None

    @property
    def record_bytes(self) -> int:
        return max(self.width, 1) * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, self.width) if self.width else (self.count,)

    def __len__(self) -> int:
        return self.count

    def _empty(self, m: int) -> torch.Tensor:
        return torch.empty((m, self.width) if self.width else (m,), dtype=self.dtype)

    def _read_span(self, fd: int, lo: int, hi: int, out: torch.Tensor) -> None:
        """Records lo..hi-1 into out [hi - lo, ...] (contiguous)."""
        start = self.offset + lo * self.record_bytes
        if self.sums is not None:
            self.sums.verify(fd, start, start + (hi - lo) * self.record_bytes)
        self._read_into(fd, byte_view(out), start)

    def _read_into(self, fd: int, view: memoryview, start: int) -> None:
        """The file's bytes from `start` into all of `view` (checked by the caller)."""
        want, done = view.nbytes, 0
        while done < want:
            got = os.preadv(fd, [view[done:]], start + done)
            if got == 0:
                raise OSError(f"{self.path} ends before byte {start + want} (it should hold {self.count} records)")
            done += got

    def read(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Records at index [m] (any order, repeats allowed) -> [m, width] (into `out` if given); nearby
        records share one read. Sorted indices are read straight into place."""
        self._check(index)
        out = self._empty(index.numel()) if out is None else out
        if index.numel() and bool((index.diff() >= 0).all()):
            self._read_sorted(index, out)
            return out
        for positions, values in self._scan(index, SCAN_ROWS):
            out.index_copy_(0, positions, values)
        return out

    def _read_sorted(self, index: torch.Tensor, out: torch.Tensor) -> None:
        """Records at the non-decreasing index [m] into out [m, ...] (see `_read_spans`)."""
        _, ordered, spans = coalesce(index, self.record_bytes)
        with self.opened() as fd:
            self._read_spans(fd, self._checked_spans(fd, ordered, spans), ordered, out, 0)

    def _read_spans(
        self,
        fd: int,
        table: list[tuple[int, int, int, int, bool]],
        ordered: torch.Tensor,
        out: torch.Tensor,
        start: int,
    ) -> None:
        """The records of spans `table` (see `_checked_spans`; checked) into out: ordered[j] into out[j - start].
        A span that holds every record of its range once is read straight into place; the others are read one
        after another into a scratch buffer of SPAN_BYTES (one span fits) and their records picked at once."""
        rb, target, picked, rows = self.record_bytes, byte_view(out), [], 0
        room = max(1, SPAN_BYTES // rb)  # records: any span fits
        scratch = self._empty(min(room, sum(hi - lo for lo, hi, _, _, whole in table if not whole)))
        for lo, hi, first, end, whole in table:
            if whole:
                self._read_into(fd, target[(first - start) * rb : (end - start) * rb], self.offset + lo * rb)
                continue
            if rows + hi - lo > room:
                self._pick(fd, picked, scratch, ordered, out, start)
                picked, rows = [], 0
            picked.append((lo, hi, first, end))
            rows += hi - lo
        if picked:
            self._pick(fd, picked, scratch, ordered, out, start)

    def _pick(
        self,
        fd: int,
        spans: list[tuple[int, int, int, int]],
        scratch: torch.Tensor,
        ordered: torch.Tensor,
        out: torch.Tensor,
        start: int,
    ) -> None:
        """Spans (lo, hi, first, end) read one after another into `scratch` (room for all), then ordered[first:end]
        of each picked from it into out[first - start : end - start], all in one gather."""
        view, rb, at = byte_view(scratch), self.record_bytes, 0
        for lo, hi, _, _ in spans:
            self._read_into(fd, view[at * rb : (at + hi - lo) * rb], self.offset + lo * rb)
            at += hi - lo
        lo, hi, first, end = torch.tensor(spans).T  # [P] each
        counts = end - first
        span = torch.repeat_interleave(torch.arange(len(spans)), counts)  # [n] the span of each picked record
        j = first[span] + torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts)[span]  # [n] ordered positions
        read_at = (hi - lo).cumsum(0) - (hi - lo)  # [P] where each span starts in the scratch buffer
        out.index_copy_(0, j - start, torch.index_select(scratch, 0, ordered[j] - lo[span] + read_at[span]))

    def _checked_spans(
        self, fd: int, ordered: torch.Tensor, spans: list[tuple[int, int, int]]
    ) -> list[tuple[int, int, int, int, bool]]:
        """(lo, hi, first, end, whole) per span of `coalesce`: it holds ordered[first:end], `whole` when that is
        every record of lo..hi-1 once. The checksums of all the spans' blocks are checked first, together: a
        question's LTM rows come in hundreds of spans, and the reads that follow do nothing else."""
        if not spans:
            return []
        rb, (lo, hi, first) = self.record_bytes, torch.tensor(spans).T  # [S] each
        end = torch.cat([first[1:], torch.tensor([ordered.numel()])])
        distinct = not bool((ordered.diff() == 0).any())
        whole = (end - first == hi - lo) & distinct  # [S]
        if self.sums is not None:
            self.sums.verify_ranges(fd, self.offset + lo * rb, self.offset + hi * rb)
        return list(zip(*(t.tolist() for t in (lo, hi, first, end, whole)), strict=True))

    def all(self) -> torch.Tensor:
        """Every record, in one read."""
        out = self._empty(self.count)
        if self.count:
            with self.opened() as fd:
                self._read_span(fd, 0, self.count, out)
        return out

    def scan(self, index: torch.Tensor, batch: int = SCAN_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions [b], records [b, width]) for the records at index [m] in file order, at most
        max(batch, one read) records per step: positions say where in `index` each record was asked for.
        The records are a view of a buffer the next step reuses: use them (or copy them) before going on."""
        return self._scan(index, batch)

    def _check(self, index: torch.Tensor) -> None:
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.count):
            raise IndexError(f"record index out of range for {self.path} ({self.count} records)")

    def _scan(self, index: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Spans are read into one batch buffer that is handed out and then reused: a step's records are
        valid until the next step."""
        index = index.reshape(-1).to(torch.int64)
        self._check(index)
        order, ordered, spans = coalesce(index, self.record_bytes)
        if not spans:
            return
        with self.opened() as fd:
            table = self._checked_spans(fd, ordered, spans)
            widest = max(end - first for _, _, first, end, _ in table)
            buffer, step, start = self._empty(max(batch, widest)), 0, 0
            for i, (_, _, first, end, _) in enumerate(table):
                if end - start > buffer.shape[0]:  # full: read the batch's spans and hand it out first
                    self._read_spans(fd, table[step:i], ordered, buffer, start)
                    yield order[start:first], buffer[: first - start]
                    step, start = i, first
            self._read_spans(fd, table[step:], ordered, buffer, start)
            yield order[start:], buffer[: ordered.numel() - start]

    def opened(self):
        return _Descriptor(self.path)


class _Descriptor:
    """A read-only file descriptor as a context manager (links are never followed)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


Source = torch.Tensor | FileArray


class RowSpace:
    """Rows [d] by id: read-only segments (first id, tensor [c, d] or FileArray), then an in-RAM tail that
    `add` extends. Ids of different segments never overlap; ids between segments need not exist."""

    def __init__(self, width: int, dtype: torch.dtype, segments: list[tuple[int, Source]] | None = None):
        self.width, self.dtype = width, dtype
        self.segments: list[tuple[int, Source]] = list(segments or [])
        self.tail_start = self.end_of_segments
        self.tail = torch.empty(64, width, dtype=dtype)  # over-allocated: appends are amortized O(new rows)
        self.tail_rows = 0

    @property
    def end_of_segments(self) -> int:
        return max((first + len(source) for first, source in self.segments), default=0)

    @property
    def end(self) -> int:
        """One past the largest id held."""
        return max(self.end_of_segments, self.tail_start + self.tail_rows)

    def holds(self, first: int, count: int) -> bool:
        """Whether ids first..first+count-1 are all held, by one part."""
        for start, source in [*self.segments, (self.tail_start, self.tail[: self.tail_rows])]:
            if start <= first and first + count <= start + len(source):
                return True
        return count == 0

    # -- writing ---------------------------------------------------------------------------------------
    def add(self, first: int, rows: torch.Tensor) -> None:
        """Hold rows [m, d] at ids first..first+m-1 (in RAM). Ids must not be held yet."""
        m = rows.shape[0]
        if self.tail_rows and first != self.tail_start + self.tail_rows:
            self.seal()
        if first < self.end:
            raise ValueError(f"row ids from {first} are already held (held up to {self.end})")
        if not self.tail_rows:
            self.tail_start = first
        if self.tail_rows + m > self.tail.shape[0]:
            grown = self.tail.new_empty(max(2 * (self.tail_rows + m), 64), self.width)
            grown[: self.tail_rows] = self.tail[: self.tail_rows]
            self.tail = grown
        self.tail[self.tail_rows : self.tail_rows + m] = rows.to(self.dtype).cpu()
        self.tail_rows += m

    def seal(self) -> None:
        """Turn the tail into a read-only segment."""
        if self.tail_rows:
            self.segments.append((self.tail_start, self.tail[: self.tail_rows].clone()))
        self.tail_start, self.tail, self.tail_rows = self.end, self.tail.new_empty(64, self.width), 0

    def attach(self, first: int, source: Source) -> None:
        """Hold the rows of `source` (a RAM tensor or a FileArray) at ids first.. (sealing the tail first)."""
        self.seal()
        if first < self.end:
            raise ValueError(f"row ids from {first} are already held (held up to {self.end})")
        self.segments.append((first, source))
        self.tail_start = self.end

    def persisted(self, first: int, source: FileArray) -> None:
        """The rows at ids first..first+len(source)-1 are now in `source`: it replaces the file segment that
        starts at `first` (or is attached), and tail rows it covers leave RAM."""
        self.segments = [(start, s) for start, s in self.segments if start != first]
        self.segments.append((first, source))
        covered = first + len(source) - self.tail_start
        if covered > 0:
            keep = self.tail[covered : self.tail_rows].clone() if covered < self.tail_rows else None
            self.tail_start, self.tail_rows = first + len(source), 0
            self.tail = self.tail.new_empty(64, self.width)
            if keep is not None:
                self.add(self.tail_start, keep)

    # -- reading ---------------------------------------------------------------------------------------
    def _parts(self) -> list[tuple[int, Source]]:
        parts = list(self.segments)
        if self.tail_rows:
            parts.append((self.tail_start, self.tail[: self.tail_rows]))
        return parts

    def _split(self, ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, Source, torch.Tensor]]:
        """(positions in ids, source, local indices) per part that holds some of ids; every id must be held."""
        ids = ids.reshape(-1).to(torch.int64)
        found = torch.zeros(ids.numel(), dtype=torch.bool)
        for first, source in self._parts():
            inside = (ids >= first) & (ids < first + len(source))
            if bool(inside.any()):
                found |= inside
                positions = torch.nonzero(inside)[:, 0]
                yield positions, source, ids[positions] - first
        if not bool(found.all()):
            missing = int(ids[~found][0])
            raise KeyError(f"row id {missing} is not held by this row space")

    def gather(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [m, d] at ids [m] (a copy, into `out` if given). Non-decreasing ids (a layer's short-term
        rows) are read straight into place, part by part."""
        ids = ids.reshape(-1).to(torch.int64)
        out = torch.empty(ids.numel(), self.width, dtype=self.dtype) if out is None else out
        if ids.numel() and bool((ids.diff() >= 0).all()):
            self._gather_sorted(ids, out)
            return out
        for positions, source, local in self._split(ids):
            if positions.numel() == ids.numel():  # one part holds every id (a question's LTM rows): into place
                self._read_part(source, local, out)
            else:
                out.index_copy_(
                    0, positions, self._read_part(source, local, out.new_empty(positions.numel(), self.width))
                )
        return out

    def _gather_sorted(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        covered = torch.zeros(ids.numel(), dtype=torch.bool)
        for first, source in sorted(self._parts(), key=lambda part: part[0]):
            lo, hi = (int(i) for i in torch.searchsorted(ids, torch.tensor([first, first + len(source)])))
            if hi == lo:
                continue
            covered[lo:hi] = True
            self._read_part(source, ids[lo:hi] - first, out[lo:hi])
        if not bool(covered.all()):
            raise KeyError(f"row id {int(ids[~covered][0])} is not held by this row space")

    def _read_part(self, source: Source, local: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Rows `local` [m] of one part into target [m, d] (CPU, this space's dtype), selected straight into it
        where the dtypes agree (index_select: 4x faster than indexing on the CPU); returns target."""
        if isinstance(source, FileArray) and source.dtype == self.dtype:
            return source.read(local, out=target)
        if isinstance(source, FileArray):
            return target.copy_(source.read(local))
        if source.dtype == self.dtype and source.device.type == "cpu":
            return torch.index_select(source, 0, local, out=target)
        return target.copy_(torch.index_select(source, 0, local.to(source.device)))

    def scan(self, ids: torch.Tensor, batch: int = SCAN_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(positions [b], rows [b, d]) for the rows at ids [m], about `batch` rows per step, each part's rows in
        storage order: what reads every row once holds one batch, not all of them."""
        for positions, source, local in self._split(ids):
            if isinstance(source, FileArray):
                for where, rows in source.scan(local, batch):
                    yield positions[where], rows
            else:
                for start in range(0, local.numel(), batch):
                    yield positions[start : start + batch], source[local[start : start + batch]].cpu()

    # -- copies ----------------------------------------------------------------------------------------
    def clone(self) -> RowSpace:
        """A space sharing the read-only segments, with its own copy of the tail."""
        space = RowSpace(self.width, self.dtype, self.segments)
        space.tail_start, space.tail, space.tail_rows = self.tail_start, self.tail.clone(), self.tail_rows
        return space

    def ram_bytes(self) -> int:
        """Bytes of rows this space holds in RAM (segments that are tensors, and the tail)."""
        held = sum(s.numel() * s.element_size() for _, s in self.segments if isinstance(s, torch.Tensor))
        return held + self.tail.numel() * self.tail.element_size()
