"""Module paths for error messages: which submodule issued the operation being traced."""
from __future__ import annotations

from torch import nn

__all__ = ["ModulePaths"]


class ModulePaths:
    """Keeps the tracer's current module path up to date through forward hooks."""

    def __init__(self, root: nn.Module, tracer, prefix: str = ""):
        self.root, self.tracer, self.prefix = root, tracer, prefix
        self.handles: list = []

    def __enter__(self) -> "ModulePaths":
        for name, module in self.root.named_modules():
            path = f"{self.prefix}.{name}".strip(".") if self.prefix else name
            self.handles.append(module.register_forward_pre_hook(self._push(path)))
            self.handles.append(module.register_forward_hook(self._pop, always_call=True))
        return self

    def _push(self, path: str):
        def hook(module, args):
            self.tracer.path.append(path)
        return hook

    def _pop(self, module, args, output):
        if len(self.tracer.path) > 1:
            self.tracer.path.pop()

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

