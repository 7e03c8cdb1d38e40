"""Repeated blocks: finding them, caching their inputs, and capturing their layers' inputs.

Sequential calibration and block-wise distillation run a model's repeated blocks (the
``nn.ModuleList`` of transformer layers, say) one after another on cached inputs.
:func:`find_blocks` finds the list, :func:`_block_inputs` records the first block's
arguments for every batch (stopping the model there), and :class:`_Capture` records the
inputs of chosen layers inside a block, stopping the block as soon as it has them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .calibrate import first_tensor, run_batch
from .sources import SourceAdapter

__all__ = ["find_blocks"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it needs are captured."""


class _BlockCall:
    """One cached call of a block: its positional and keyword arguments, hidden state apart."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.key: int | str = 0
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            self.key = "hidden_states"
        else:
            raise ValueError(
                "sequential calibration needs the block's hidden state as its first "
                "positional argument or as hidden_states=; use Sequential(blocks=False)"
            )
        hidden = args[0] if self.key == 0 else kwargs["hidden_states"]
        self.args = tuple(args[1:]) if self.key == 0 else tuple(args)
        self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states" or self.key == 0}
        # A block must not grow a key/value cache while it is run again and again.
        for name in ("past_key_value", "past_key_values", "layer_past"):
            if name in self.kwargs:
                self.kwargs[name] = None
        if "use_cache" in self.kwargs:
            self.kwargs["use_cache"] = False
        self.hidden_dtype = hidden.dtype
        self.hidden_device = hidden.device

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(device=self.hidden_device)
        if self.key == 0:
            output = block(hidden, *self.args, **self.kwargs)
        else:
            output = block(*self.args, hidden_states=hidden, **self.kwargs)
        return first_tensor(output)


def find_blocks(model: nn.Module, targets: Sequence[str], spec: str | bool | None) -> List[str]:
    """Names of the repeated blocks to process in order (``[]``: the whole model is one unit)."""
    if spec is False:
        return []
    modules = dict(model.named_modules())
    if isinstance(spec, str):
        container = modules.get(spec)
        if not isinstance(container, nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"blocks={spec!r} is not an nn.ModuleList of the model; ModuleLists: {lists[:10]}"
            )
        return [f"{spec}.{name}" if spec else name for name in container._modules]
    best: Tuple[int, List[str]] = (0, [])
    for name, module in modules.items():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        children = [f"{name}.{child}" if name else child for child in module._modules]
        covered = sum(any(t.startswith(c + ".") for c in children) for t in targets)
        if covered > best[0]:
            best = (covered, children)
    return best[1]


def _blocks_share_arguments(model: nn.Module, blocks: List[nn.Module], batch: Any) -> bool:
    """Whether every block gets block 0's arguments (hidden state apart) on ``batch``.

    Only then can one cached call replay every block. T5's relative position bias or
    per-layer sliding-window masks, for instance, differ per block.
    """
    calls: Dict[int, _BlockCall | None] = {}

    def recorder(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index not in calls:
                try:
                    calls[index] = _BlockCall(args, kwargs)
                except ValueError:
                    calls[index] = None

        return hook

    handles = [
        block.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            run_batch(model, batch, 0)
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(blocks) or any(call is None for call in calls.values()):
        return False
    first = calls[0]
    return all(
        calls[i].key == first.key
        and _same(calls[i].args, first.args)
        and _same(calls[i].kwargs, first.kwargs)
        for i in range(1, len(blocks))
    )


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared count as different
        return False


class _Capture:
    """Forward pre-hooks that record the inputs of chosen layers and stop the pass after them."""

    def __init__(self, modules: Dict[str, nn.Module], adapters: Dict[str, SourceAdapter]) -> None:
        self.modules = modules
        self.adapters = adapters
        self.inputs: Dict[str, torch.Tensor] = {}
        self.raw: Dict[str, torch.Tensor] = {}  # the tensors as the layers received them
        self.order: List[str] = []
        self.stop_after: set | None = None
        self.group_input: torch.Tensor | None = None
        self.discover = False
        self.handles: List[Any] = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or name in self.inputs:
                return
            value = args[0]
            if self.discover:
                # The group is the first layer reached and the layers right after it
                # that read the very same tensor (e.g. q/k/v, or gate/up).
                if self.group_input is not None and value is not self.group_input:
                    raise _Stop
                self.group_input = value
                self.order.append(name)
            elif self.stop_after is not None and name not in self.stop_after:
                return
            self.raw[name] = value
            self.inputs[name] = self.adapters[name].input_rows(value)
            if self.stop_after is not None and set(self.inputs) >= self.stop_after:
                raise _Stop

        return hook

    def run(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except _Stop:
            pass


def _block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Sequence[Any], cache_device: str
):
    """The arguments of the first block for every batch (the model is stopped there)."""
    calls: List[_BlockCall] = []
    hidden: List[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _BlockCall(args, kwargs)
        calls.append(call)
        value = args[0] if call.key == 0 else kwargs["hidden_states"]
        hidden.append(value.detach().to(cache_device, copy=True))
        raise _Stop

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    run_batch(model, batch, i)
                except _Stop:
                    pass
                if len(calls) != i + 1:
                    raise ValueError(
                        f"calibration batch {i} never reached the first block; "
                        "use Sequential(blocks=False)"
                    )
    finally:
        handle.remove()
    return calls, hidden
