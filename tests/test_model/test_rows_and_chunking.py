"""Rows by id (model/memory/rows.py) and text to chunks (model/text/chunking.py): exact reads in bounded batches, and
streamed tokenization that equals tokenizing the whole text."""

from __future__ import annotations

import random

import pytest
import torch

import model as mp
from model.memory import rows as rows_module
from model.memory.rows import BlockSums, DamagedFile, FileArray, RowSpace, block_sums, coalesce
from model.text.chunking import chunk_sizes, chunked, token_stream
from model.text.tokenizer import encode


def file_of(tmp_path, values: torch.Tensor) -> FileArray:
    path = tmp_path / "rows.bin"
    path.write_bytes(values.contiguous().view(torch.uint8).numpy().tobytes())
    return FileArray(path, values.shape[0], values.shape[1] if values.dim() > 1 else 0, values.dtype)


@pytest.mark.parametrize("span_records", [None, 10])  # 10: many reads, picked in many rounds
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_a_file_array_reads_any_index_exactly(tmp_path, monkeypatch, dtype, span_records):
    if span_records is not None:
        monkeypatch.setattr(rows_module, "SPAN_BYTES", span_records * 7 * dtype.itemsize)
    values = (torch.randn(500, 7) * 100).to(dtype) if dtype != torch.int64 else torch.randint(0, 99, (500, 7))
    array = file_of(tmp_path, values)
    g = torch.Generator().manual_seed(0)
    for index in (
        torch.arange(500),  # all, in order: read in place
        torch.randint(0, 500, (300,), generator=g),  # repeats, any order
        torch.randint(0, 500, (300,), generator=g).sort().values,  # sorted with gaps and repeats
        torch.tensor([499, 0]),
        torch.empty(0, dtype=torch.int64),
    ):
        assert torch.equal(array.read(index), values[index])
        seen = torch.zeros(index.numel(), dtype=torch.bool)
        for positions, got in array.scan(index, batch=16):
            assert torch.equal(got, values[index[positions]])
            assert not seen[positions].any()
            seen[positions] = True
        assert seen.all()
    assert torch.equal(array.all(), values)
    with pytest.raises(IndexError):
        array.read(torch.tensor([500]))


def test_scans_hold_one_batch_and_nearby_records_share_a_read(tmp_path, monkeypatch):
    values = torch.randn(4000, 16)  # 64-byte records
    array = file_of(tmp_path, values)
    monkeypatch.setattr(rows_module, "SPAN_BYTES", 64 * 100)  # at most 100 records per read
    index = torch.arange(0, 4000, 2)  # every other record: gaps narrow enough to read through
    _, _, spans = coalesce(index, 64)
    assert len(spans) == 40 and all(hi - lo <= 100 for lo, hi, _ in spans)
    batches = [positions.numel() for positions, _ in array.scan(index, batch=128)]
    assert sum(batches) == 2000 and max(batches) < 128 + 100  # a batch ends after the read that fills it
    assert len(coalesce(torch.tensor([0, 3999]), 64)[2]) == 2  # far apart: two reads


@pytest.mark.parametrize("index", [[0, 1, 1, 2, 5000], [5000, 1, 2, 1, 0], [7], []])
def test_coalesce_orders_sorted_and_shuffled_indices_alike(index):
    """An index already in file order skips the sort; either way order is a stable argsort and the spans agree."""
    index = torch.tensor(index, dtype=torch.int64)
    order, ordered, spans = coalesce(index, 64)
    assert torch.equal(order, index.argsort(stable=True)) and torch.equal(ordered, index[order])
    assert spans == coalesce(index.sort().values, 64)[2]


def test_a_read_checks_the_blocks_its_spans_touch_once_and_no_others(tmp_path, monkeypatch):
    monkeypatch.setattr(rows_module, "SUM_BLOCK_BYTES", 256)  # 4 records of 64 bytes per block
    monkeypatch.setattr(rows_module, "GAP_BYTES", 128)  # read through gaps of at most 2 records
    values = torch.randn(400, 16)  # 100 blocks
    data = values.view(torch.uint8).numpy().tobytes()
    (tmp_path / "rows.bin").write_bytes(data)
    ends, crcs = (torch.tensor(column) for column in zip(*block_sums(data, 0), strict=True))
    sums = BlockSums(tmp_path / "rows.bin", ends, crcs)
    array = FileArray(tmp_path / "rows.bin", 400, 16, torch.float32, sums=sums)
    index = torch.tensor([1, 2, 3, 200, 201, 203, 399])  # spans: records 1-3, 200-203 (a gap), 399
    assert torch.equal(array.read(index), values[index])
    assert torch.nonzero(sums.verified)[:, 0].tolist() == [0, 50, 99]  # blocks 0, 50 and 99, nothing else
    damaged = bytearray(data)
    damaged[64 * 300] ^= 1  # record 300, block 75
    (tmp_path / "rows.bin").write_bytes(bytes(damaged))
    assert torch.equal(array.read(index), values[index])  # checked blocks are not read again for their sums
    with pytest.raises(DamagedFile, match="bytes 19200-19456 do not match their checksum"):
        array.read(torch.tensor([5, 298, 301]))


def test_a_row_space_holds_segments_and_a_tail_by_id(tmp_path):
    d = 4
    initial, on_disk = torch.randn(10, d), torch.randn(20, d)
    space = RowSpace(d, torch.float32)
    space.attach(0, initial)
    space.attach(10, file_of(tmp_path, on_disk))
    space.add(30, torch.full((5, d), 7.0))
    everything = torch.cat([initial, on_disk, torch.full((5, d), 7.0)])
    ids = torch.tensor([34, 0, 12, 29, 30, 5, 12])
    assert torch.equal(space.gather(ids), everything[ids])
    assert torch.equal(space.gather(torch.arange(35)), everything)  # sorted: read in place, part by part
    for one_part in (torch.tensor([7, 0, 3, 3]), torch.tensor([25, 11, 19]), torch.tensor([33, 30])):
        out = torch.full((one_part.numel(), d), float("nan"))
        assert space.gather(one_part, out=out) is out  # unsorted, one part: selected straight into out
        assert torch.equal(out, everything[one_part])
    seen = torch.cat([positions for positions, _ in space.scan(ids, batch=2)])
    assert sorted(seen.tolist()) == list(range(7))
    assert space.holds(10, 20) and space.holds(30, 5) and space.end == 35
    assert not space.holds(25, 10) and not space.holds(30, 6)  # held by one part, entirely
    with pytest.raises(KeyError):
        space.gather(torch.tensor([35]))
    with pytest.raises(ValueError, match="already held"):
        space.add(12, torch.zeros(1, d))
    copy = space.clone()
    copy.add(35, torch.zeros(1, d))
    assert space.end == 35 and copy.end == 36  # the tail is copied, the segments shared
    # rows written to the file leave RAM: the file segment grows over the tail
    grown = torch.cat([on_disk, torch.full((5, d), 7.0)])
    (tmp_path / "grown").mkdir()
    space.persisted(10, file_of(tmp_path / "grown", grown))
    assert space.tail_rows == 0 and torch.equal(space.gather(torch.arange(35)), everything)


@pytest.mark.parametrize("huge", [True, False], ids=["huge-pages", "populated"])
def test_a_populated_empty_tensor_is_its_own_writable_memory(monkeypatch, huge):
    monkeypatch.setattr(rows_module, "huge_pages_on_request", lambda: True)
    monkeypatch.setattr(rows_module, "free_huge_bytes", lambda: (1 << 30) if huge else 0)
    shape = (3, 1 << 18)  # 3 MB of float32: past the size under which torch.empty serves
    first, second = rows_module.populated_empty(shape, torch.float32), rows_module.populated_empty(shape, torch.float32)
    assert first.shape == shape and first.dtype == torch.float32 and first.is_contiguous()
    values = torch.randn(shape)
    first.copy_(values)
    second.fill_(2.0)
    assert torch.equal(first, values) and bool((second == 2.0).all())


def test_free_huge_pages_are_counted_from_the_buddy_allocator_blocks():
    buddyinfo = (
        "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3\n"
        "Node 0, zone   Normal  21293  19517  14526   7485   4238   2035    501    378    395     22    640\n"
    )
    mb = 1 << 20  # 2 MB huge pages of 4 kB pages: order 9 counts once, order 10 twice
    assert rows_module.free_block_bytes(buddyinfo, 2 * mb, 4096) == (1 + 3 * 2 + 22 + 640 * 2) * 2 * mb
    assert rows_module.free_block_bytes(buddyinfo, 4 * mb, 4096) == (3 + 640) * 4 * mb


class WordTokenizer:
    """BPE-like: whitespace attaches to the following word, so a cut inside "a b" changes the ids."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces, word = [], ""
        for ch in text:
            if ch.isspace() and word and not word.isspace():
                pieces.append(word)
                word = ""
            word += ch
        return [hash(p) % 10**6 for p in [*pieces, word] if p]


@pytest.mark.parametrize("tokenizer", [WordTokenizer(), mp.load("tiny").tokenizer], ids=["words", "bytes"])
def test_a_streamed_text_tokenizes_exactly_as_the_whole_text(tokenizer):
    rng = random.Random(0)
    words = ["the", "lamp", "room", "73914", "é", "\n\n", "  ", "ferry,", "Korsa"]
    text = "".join(rng.choice(words) + rng.choice([" ", "", "\n", "\t "]) for _ in range(6000))
    cuts = sorted(rng.sample(range(1, len(text)), 40))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]  # as a file is read
    streamed = sum(token_stream(tokenizer, pieces, block_chars=1000), [])
    assert streamed == encode(tokenizer, text)


@pytest.mark.parametrize("total", [0, 15, 16, 100, 512, 513, 527, 528, 5000])
def test_chunks_are_whole_except_a_short_tail_merged_into_the_chunk_before(total):
    ids = list(range(total))
    pieces = [ids[i : i + 37] for i in range(0, total, 37)]
    chunks = list(chunked(pieces, 512))
    assert sum(chunks, []) == ids and [len(c) for c in chunks] == chunk_sizes(total, 512)
    if total > 512:
        assert all(len(c) == 512 for c in chunks[:-1]) and 16 <= len(chunks[-1]) <= 512 + 15
    with pytest.raises(ValueError):
        list(chunked(pieces, 8))
