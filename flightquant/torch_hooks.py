"""Collect the inputs of every ``torch.nn.Linear`` of a model while it runs.

:class:`LinearInputs` installs a forward pre-hook on each Linear module: every call adds
the module's input (``[..., in_features]``: the leading dimensions are tokens) to a
calibration statistic, in-process (:class:`flightquant.calibration.Accumulator`) or in a
session on a flightquant server (buffered into batches of about ``batch_bytes`` and sent
with :meth:`flightquant.Client.calibrate`), under the weight's name.

torch is an optional extra (``pip install flightquant[hf]``); this module imports it only
when a collector is made.

>>> with LinearInputs(model) as hooks:                     # doctest: +SKIP
...     model(input_ids)
>>> hooks.accumulator.table()                              # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .calibration import Accumulator, activation_batch

__all__ = ["LinearInputs"]

#: activations buffered before a batch goes to the server
DEFAULT_BATCH_BYTES = 16 << 20


class LinearInputs:
    """Forward pre-hooks on every ``torch.nn.Linear`` of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
    client : flightquant.Client, optional
        Send the activations to ``session`` on this client's server; without it they are
        added to :attr:`accumulator` in-process.
    session : str, optional
        The calibration session (needed with ``client``).
    names : callable, optional
        ``names(module_name) -> weight name`` (None skips the module); default
        ``f"{module_name}.weight"``, the name in the model's state dict.
    batch_bytes : int
        With ``client``: activations buffered before a batch is sent.

    The hooks stay until :meth:`close` (or the end of a ``with`` block), which also sends
    what is still buffered.
    """

    def __init__(
        self,
        model: Any,
        *,
        client: Any = None,
        session: str | None = None,
        names: Callable[[str], str | None] | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ):
        import torch

        if client is not None and not session:
            raise ValueError("sending to a server needs a session name")
        self.client = client
        self.session = session
        self.batch_bytes = int(batch_bytes)
        self.accumulator = Accumulator()
        self.totals = {"batches": 0, "rows": 0, "tokens": 0, "elements": 0}
        self.skipped: list[str] = []
        self._pending: list[tuple[str, np.ndarray]] = []
        self._pending_bytes = 0
        self._handles = []
        name_of = names or (lambda module_name: f"{module_name}.weight")
        for module_name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            name = name_of(module_name)
            if name is None:
                self.skipped.append(module_name)
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        self.layers = len(self._handles)

    def _hook(self, name: str):
        def hook(module, args):
            if not args:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to("cpu", dtype=_float32()).numpy()
            if self.client is None:
                sums = self.accumulator.add(name, x)
                self._count(sums.totals() | {"batches": 0})
            else:
                self._pending.append((name, x.copy()))
                self._pending_bytes += x.nbytes
                if self._pending_bytes >= self.batch_bytes:
                    self.flush()

        return hook

    def _count(self, totals: dict[str, int]) -> None:
        for key in self.totals:
            self.totals[key] += int(totals.get(key, 0))

    def flush(self) -> None:
        """Send the buffered activations to the session (no-op in-process)."""
        if self.client is None or not self._pending:
            return
        batch = activation_batch(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._count(self.client.calibrate(self.session, batch))

    def close(self) -> None:
        """Send what is buffered and remove the hooks (idempotent)."""
        try:
            self.flush()
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def __enter__(self) -> LinearInputs:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # do not send a half-run's buffer on top of an error
            self._pending = []
            self.close()


def _float32():
    import torch

    return torch.float32
