"""Scale features of the calibration pass: recomputed inputs, --resume, the batched truth sweep, prefetch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from bitalloc.model.calib import calibration_windows, tokenize
from bitalloc.model.checkpoint import Checkpoint
from bitalloc.model.inventory import build_inventory
from bitalloc.model.layerwise import LayerwiseModel
from bitalloc.model.prefetch import Prefetch
from bitalloc.model.replay import LayerInputs
from bitalloc.plan import DEFAULT_CANDIDATES
from bitalloc.sensitivity import collect, combined, resume, truth

from .conftest import build_tiny_model


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("deep") / "m", num_hidden_layers=5)


@pytest.fixture(scope="module")
def deep_ids(deep, calib_file):
    return calibration_windows(tokenize(deep, calib_file), 6 * 32, 32, seed=0)


def test_replayed_inputs_equal_a_plain_forward_bit_for_bit(deep, deep_ids):
    lm = LayerwiseModel(Checkpoint(deep), "cpu")
    plain = [lm.embedding_weight()[deep_ids]]
    for i in range(lm.num_layers):
        out = torch.empty_like(plain[-1])
        lm.run_layer_batched(lm.load_layer(i), plain[-1], out, 4)
        lm.release_layer(i)
        plain.append(out)
    stream = LayerInputs(lm, deep_ids, 4)
    try:
        assert stream.k == 3 and sorted(stream.checkpoints) == [0, 3]
        assert torch.equal(stream.top, plain[-1])
        for i in reversed(range(lm.num_layers)):
            assert torch.equal(stream.input(i), plain[i]), i
        assert stream.disk_stores == 4 < lm.num_layers + 2
    finally:
        stream.close()


def test_batched_truth_equals_one_pass_per_pair(deep, deep_ids, monkeypatch):
    ckpt = Checkpoint(deep)
    units = [u for u in build_inventory(ckpt).quantized if u.layer is not None]
    pairs = [(units[k], DEFAULT_CANDIDATES[j]) for k, j in ((0, 0), (9, 1), (3, 0), (20, 2), (33, 0))]
    lm = LayerwiseModel(ckpt, "cpu")
    together = truth.TruthRunner(lm, deep_ids).measure(pairs)
    monkeypatch.setattr(truth, "MAX_STREAMS", 1)
    alone = [truth.TruthRunner(lm, deep_ids)(u, c) for u, c in pairs]
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-9)
    assert all(v != 0 for v in together)


def _tables_equal(a, b) -> None:
    assert a.tensors == b.tensors and sorted(a.scores) == sorted(b.scores)
    for name in a.scores:
        np.testing.assert_array_equal(a.scores[name], b.scores[name], err_msg=name)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for name in a.stats:
        np.testing.assert_array_equal(a.stats[name], b.stats[name], err_msg=name)


class Interrupted(Exception):
    """Stands for whatever stops a run (a signal, a lost machine) after some layers."""


def test_resume_after_an_interruption_gives_the_identical_table(deep, deep_ids, tmp_path, monkeypatch):
    ckpt = Checkpoint(deep)
    inv = build_inventory(ckpt, include_lm_head=True)
    monkeypatch.setattr(combined, "SAMPLE_UNITS", 4)
    cands = list(DEFAULT_CANDIDATES)
    reference = collect.measure_errors(ckpt, inv, deep_ids, cands, device="cpu")

    save = resume.Checkpoints.save_layer
    saved: list[int] = []
    stop_after = [3]

    def interrupted(self, layer, rows, grad):
        save(self, layer, rows, grad)
        saved.append(layer)
        if len(saved) == stop_after[0]:
            raise Interrupted

    monkeypatch.setattr(resume.Checkpoints, "save_layer", interrupted)
    with pytest.raises(Interrupted):
        collect.measure_errors(ckpt, inv, deep_ids, cands, device="cpu", resume=str(tmp_path))
    assert saved == [4, 3, 2]
    (state,) = tmp_path.iterdir()
    assert state.name.startswith("bitalloc-resume-") and (state / "grad.json").exists()

    saved.clear()
    stop_after[0] = None
    resumed = collect.measure_errors(ckpt, inv, deep_ids, cands, device="cpu", resume=str(tmp_path))
    assert saved == [1, 0]  # only the layers the first run did not finish
    _tables_equal(reference, resumed)
    assert list(tmp_path.iterdir()) == []  # checkpoints removed once the pass completed

    other = collect.measure_errors(ckpt, inv, deep_ids[:4], cands, device="cpu", resume=str(tmp_path))
    assert saved == [1, 0, 4, 3, 2, 1, 0]  # other token ids: another key, nothing reused
    assert other.meta["calib_sequences"] == 4


def test_prefetch_reads_the_next_layer_of_each_sweep_ahead_and_hands_back_what_was_asked():
    """Forward, backward and another forward sweep: every layer asked for is the one handed back, and after each
    sweep's first layer the layer asked for was already read by the background thread."""
    reads: list[tuple[int, bool]] = []  # (layer, read in line by the asking thread)

    def read(i: int) -> dict[str, torch.Tensor]:
        reads.append((i, threading.current_thread() is threading.main_thread()))
        return {"w": torch.full((2,), float(i))}

    n = 6
    pre = Prefetch(read, n, background=True)
    order = list(range(n)) + list(reversed(range(n))) + list(range(n))
    for i in order:
        assert float(pre.get(i)["w"][0]) == i
    pre._pool.shutdown(wait=True)  # the guess after the last load (layer n - 2) is still being read
    # in line only where no guess can know: the first load and each end's layer loaded twice in a row
    assert [i for i, main in reads if main] == [0, n - 1, 0]
    assert len(reads) == len(order) + 1  # no guess wasted but the last: a guess already under way is kept
    alone = Prefetch(read, n, background=False)
    assert float(alone.get(3)["w"][0]) == 3 and reads[-1] == (3, True)
