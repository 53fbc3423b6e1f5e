"""Read the next decoder layer from disk while the current one computes.

Every pass over a checkpoint that does not fit in memory reads each decoder layer from disk once
per sweep (forward, backward, measured sample): at 8B, 16 GB of bf16 three times. Done in line,
those reads leave the GPU idle; a background thread that reads the layer the sweep will want next
hides them behind the current layer's compute. The guess follows the sweep's direction (onwards in
the direction of the last two loads, down from the top layer, up from the bottom one). A wrong guess costs one
layer's read and one layer of host memory, never a wrong result: the layer asked for is then read
in line. The thread does host work only (page faults, copies into pinned memory), which releases
the GIL in torch, so it does not hold up the launching of GPU work.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch

Reader = Callable[[int], dict[str, torch.Tensor]]


class Prefetch:
    """Layers by index from ``read``, the likely next one read ahead when ``background`` is set."""

    def __init__(self, read: Reader, num_layers: int, background: bool):
        self.read, self.num_layers = read, num_layers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitalloc-prefetch") if background else None
        self._pending: Optional[tuple[int, Future]] = None
        self._last: Optional[int] = None
        self._down = False

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s host tensors (read ahead if it was the guess), then the next guess is started."""
        pending, self._pending = self._pending, None
        host = pending[1].result() if pending is not None and pending[0] == i else self.read(i)
        nxt = self.guess(i)
        self._last = i
        if self._pool is not None and nxt is not None:
            kept = pending is not None and pending[0] == nxt  # guessed already (the top layer loaded twice)
            self._pending = pending if kept else (nxt, self._pool.submit(self.read, nxt))
        return host

    def guess(self, i: int) -> Optional[int]:
        """The layer a sweep that just loaded ``i`` loads next: onwards in its direction, turning at either end."""
        if i == self.num_layers - 1:
            self._down = True
        elif i == 0:
            self._down = False
        elif self._last is not None and self._last != i:
            self._down = self._last > i
        nxt = i - 1 if self._down else i + 1
        return nxt if 0 <= nxt < self.num_layers else None
