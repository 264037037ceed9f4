"""Training data: documents, the train/validation split, evaluation windows (no torch needed)."""

from __future__ import annotations

from edgellm.pipeline.data import eval_windows, load_dataset, split_documents


def _one_record_per_line(path, n_bytes: int = 180_000) -> str:
    lines, i = [], 0
    while sum(map(len, lines)) < n_bytes:
        lines.append(f"device {i % 97} reports {20 + i % 13}.{i % 10} degrees and battery at {i % 100} percent\n")
        i += 1
    text = "".join(lines)
    path.write_text(text)
    return text


def test_a_file_without_blank_lines_still_gets_a_validation_split(tmp_path):
    text = _one_record_per_line(tmp_path / "records.txt")

    ds = load_dataset(tmp_path / "records.txt")

    val_chars = sum(map(len, ds.val))
    assert ds.val and ds.train
    assert 0.01 * len(text) < val_chars < 0.25 * len(text)
    # nothing lost or duplicated: the pieces are the file's lines, each on one side only
    assert sorted("".join(ds.train + ds.val).splitlines()) == sorted(text.splitlines())
    # enough validation text for windows of the default training length (129 tokens even at one
    # token per character is far below what the split leaves)
    import numpy as np

    stream = np.frombuffer("".join(ds.val).encode(), dtype=np.uint8).astype(np.int64)
    assert eval_windows(stream, 128).shape[1] == 129


def test_the_piece_split_is_deterministic(tmp_path):
    _one_record_per_line(tmp_path / "records.txt", 40_000)

    a = load_dataset(tmp_path / "records.txt")
    b = load_dataset(tmp_path / "records.txt")

    assert a.val == b.val and a.train == b.train


def test_many_documents_are_split_whole():
    docs = [f"document {i}\nsecond line {i}\n" for i in range(200)]

    train, val = split_documents(docs, 0.1)

    assert val and set(train) | set(val) == set(docs) and len(train) + len(val) == len(docs)
