import gzip
import json
import lzma

import numpy as np
import pytest

from bitalloc.model.calib import calibration_windows, eval_windows, read_text
from bitalloc.errors import CalibrationError


def test_reads_txt_xz_gz_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
        f.write("hello xz")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert read_text(tmp_path / "a.txt") == "hello world"
    assert read_text(tmp_path / "a.txt.xz") == "hello xz"
    assert read_text(tmp_path / "a.jsonl.gz") == "first\n\nsecond"


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CalibrationError, match=r"b.jsonl:2"):
        read_text(tmp_path / "b.jsonl")


def test_calibration_windows_are_seeded_and_disjoint():
    ids = np.arange(10_000)
    a = calibration_windows(ids, 2048, 256, seed=3)
    assert a.shape == (8, 256)
    assert (a == calibration_windows(ids, 2048, 256, seed=3)).all()
    assert not (a == calibration_windows(ids, 2048, 256, seed=4)).all()
    starts = sorted(int(w[0]) for w in a)
    assert all(b - s >= 256 for s, b in zip(starts, starts[1:]))
    with pytest.raises(CalibrationError, match="lower --calib-tokens"):
        calibration_windows(ids, 20_000, 256, seed=0)


def test_eval_windows_take_the_first_tokens():
    w = eval_windows(np.arange(1000), 512, 128)
    assert w.shape == (4, 128) and int(w[0, 0]) == 0 and int(w[-1, -1]) == 511
    with pytest.raises(CalibrationError):
        eval_windows(np.arange(100), 512, 128)
