"""A TorchDispatchMode for the tests: runs every op as is and records what reached the dispatcher's
Python mode (what torch.compile traces): ``ops`` counts op packets by name ("torchpeer.x.default"
-> "torchpeer.x"), ``calls`` lists (short op name, output shape or None) in order."""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[str(func.overloadpacket)] += 1
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.calls.append((func.overloadpacket.__name__, shape))
        return out
