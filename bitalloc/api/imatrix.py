"""llama.cpp's importance matrix, written from bitalloc's calibration pass (``--imatrix FILE.gguf``).

The file is what ``llama-imatrix`` writes (tools/imatrix/imatrix.cpp, GGUF format): key-values
``general.type = "imatrix"``, ``imatrix.datasets`` (the calibration files), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (calibration windows and their length), and for every weight that multiplies
activations two F32 tensors named after its GGUF tensor: ``<name>.in_sum2`` [n_mat, n_in], the sum over
tokens of each input column's square, and ``<name>.counts`` [n_mat, 1], the tokens summed (n_mat is the
number of experts of a fused expert tensor, else 1). llama-quantize divides the one by the other. The
sums come from the same forward hooks that give the error table its H (its diagonal), so no second pass
over the text is needed. The token embedding has none (llama.cpp looks rows up, it multiplies nothing).
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import ScoresError
from ..model.checkpoint import Checkpoint
from ..model.gguf_names import gguf_name, tensor_name_map
from ..model.inventory import Inventory
from ..plan import atomic_write_bytes
from ..sensitivity.table import IN_SUM2
from ..sensitivity.table import ErrorTable


def imatrix_arrays(table: ErrorTable, inv: Inventory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF tensor name -> (in_sum2 [n_mat, n_in], counts [n_mat, 1]), float32, experts in index order.

    ``inv`` is any inventory of the table's checkpoint: only its architecture, layers and experts are read,
    which lock states do not change."""
    if IN_SUM2 not in table.vectors:
        raise ScoresError("this error table holds no activation sums for an importance matrix; compute it with "
                          "--target llamacpp (and --calib)")
    values, offsets = table.vectors[IN_SUM2]
    names = tensor_name_map(inv.arch, inv.num_layers)
    expert_of = {u.tensor: u.expert for u in inv.units}
    parts: dict[str, list[tuple[int, np.ndarray, int]]] = defaultdict(list)
    for r, tensor in enumerate(table.tensors):
        row = values[offsets[r]:offsets[r + 1]]
        if row.size == 0:  # no input matrix (the token embedding)
            continue
        gg = gguf_name(names, tensor)
        if gg is None:
            raise ScoresError(f"{tensor} has no GGUF tensor name for {inv.arch}")
        parts[gg].append((expert_of.get(tensor) or 0, row, int(table.tokens[r])))
    out = {}
    for gg, members in sorted(parts.items()):
        members.sort(key=lambda m: m[0])
        out[gg] = (np.stack([m[1] for m in members]).astype(np.float32),
                   np.array([[m[2]] for m in members], dtype=np.float32))
    return out


def write_imatrix(table: ErrorTable, ckpt: Checkpoint, inv: Inventory, path: str | Path) -> Path:
    """Write the importance matrix of ``table``'s calibration pass over ``ckpt`` (inventory ``inv``, which the
    caller built for that pass) to ``path`` (atomically)."""
    import gguf

    table.check_matches(ckpt.config_sha256, ckpt.index_sha256, table.candidates, [])
    arrays = imatrix_arrays(table, inv)
    cal = table.meta.get("calibration") or {}
    with tempfile.TemporaryDirectory(dir=Path(os.path.realpath(path)).parent) as tmp:
        tmp_file = Path(tmp) / "imatrix.gguf"
        w = gguf.GGUFWriter(str(tmp_file), arch="")  # an empty string is not written: like llama-imatrix's files
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [str(cal.get("file", "bitalloc calibration"))])
        w.add_uint32("imatrix.chunk_count", int(table.meta.get("calib_sequences", 0)))
        w.add_uint32("imatrix.chunk_size", int(table.meta.get("seqlen", 0)))
        for gg, (in_sum2, counts) in arrays.items():
            w.add_tensor(f"{gg}.in_sum2", in_sum2)
            w.add_tensor(f"{gg}.counts", counts)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = tmp_file.read_bytes()
    return atomic_write_bytes(Path(path), data)
