"""torch.fx tracing on an example: the model runs on a concrete example as it is traced, so that tensor metadata
(``x.shape``, ``x.size()``, ``x.dtype``) are the example's Python values and control flow on them (``if x.dtype !=
...``, ``b, t, c = x.shape``, a buffer sliced to the sequence length) takes the example's branch instead of failing.

photosim's graphs have fixed per-sample shapes anyway (capture records them from the example, batch 1), so resolving
shapes on the example loses nothing; control flow on tensor *values* (a branch that could change with the input) is
refused with its node and source line.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import fx, nn

from photosim.errors import PhotosimError
from photosim.frontend.hf import embedding_refusal
from photosim.frontend.nonlinearity import Curve

_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_METADATA_METHODS = {"size", "dim", "ndimension", "numel", "is_floating_point", "is_complex", "get_device"}


def source_line(node: fx.Node) -> str:
    """The innermost frame of ``node``'s recorded stack outside torch (the model's own line), for error messages."""
    frames = [line.strip() for line in (node.stack_trace or "").splitlines() if line.strip().startswith("File ")]
    user_frames = [f for f in frames if f"{os.sep}torch{os.sep}" not in f and __file__ not in f]  # not fx's, not ours
    return user_frames[-1] if user_frames else "source line unknown"


class _ConcreteProxy(fx.Proxy):
    """A Proxy whose metadata (``x.shape``, ``x.size()``, ``x.dtype``) are its example value's, plain Python values
    that Python code may branch on and that become literals in the graph (a size slicing a position-id buffer folds
    to a constant); ``len()`` and ``__index__``, which fx refuses for a plain Proxy, are the example value's when
    they do not depend on the input's values."""

    def __getattr__(self, k: str) -> Any:
        """Metadata from the example value; anything else traced as fx does."""
        if k in _METADATA_ATTRIBUTES or k in _METADATA_METHODS:
            return getattr(self.tracer.values[self.node], k)
        return super().__getattr__(k)

    def __len__(self) -> int:
        return len(self.tracer.fixed(self, "a length"))

    def __index__(self) -> int:
        return int(self.tracer.fixed(self, "an index or size"))


class RecordingTracer(fx.Tracer):
    """symbolic_trace with source lines recorded, for error messages; photosim's Curve is one node."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """fx's leaves (torch.nn layers) and photosim's Curve."""
        return isinstance(m, Curve) or super().is_leaf_module(m, module_qualified_name)


class ConcreteTracer(RecordingTracer):
    """RecordingTracer that runs every traced call on an example as well: ``if``, ``for`` and unpacking on shapes,
    dtypes and other tensor metadata take the example's branch; on tensor values they are refused by node and line."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.example = example
        self.proxy_buffer_attributes = True  # buffers sliced by a traced size (position ids) become graph constants
        self.values: dict[fx.Node, Any] = {}  # the example's value of each traced node
        self.input_dependent: set[fx.Node] = set()  # nodes whose value may change with the input's values
        self.running = False  # True while a call runs on example values (modules and parameters act as in eager)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """A module attribute: its value while a call runs on the example, else fx's proxy of it."""
        return attr_val if self.running else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        """A submodule call: run eagerly while a call runs on the example, else traced by fx."""
        return forward(*args, **kwargs) if self.running else super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **options: Any) -> fx.Proxy:
        """Add the node as fx does, and compute its example value."""
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        if kind == "placeholder" or any(a in self.input_dependent for a in proxy.node.all_input_nodes):
            self.input_dependent.add(proxy.node)
        args, kwargs = fx.node.map_aggregate((args, kwargs), self._value)
        self.running = True
        try:
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
        except PhotosimError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own call failing on the example, reported at its line
            module = self.root.get_submodule(str(target)) if kind == "call_module" else None
            name, line = str(target) if module is not None else proxy.node.name, source_line(proxy.node)
            if isinstance(module, nn.Embedding):
                raise PhotosimError(f"the model cannot run on integers: {embedding_refusal(name, line)}.") from exc
            what = type(module).__name__ if module is not None else getattr(target, "__name__", str(target))
            raise PhotosimError(f"{name} ({what}) at {line} fails on the example input ({type(exc).__name__}: "
                                f"{exc}); give photosim the input the model expects.") from exc
        finally:
            self.running = False
        return proxy

    def _run(self, kind: str, target: Any, args: Any, kwargs: dict) -> Any:
        """The example's value of one traced call, computed as eager PyTorch would."""
        with torch.no_grad():
            if kind == "placeholder":
                return self.example
            if kind == "get_attr":
                return functools.reduce(getattr, str(target).split("."), self.root)
            if kind == "call_module":
                return self.root.get_submodule(str(target))(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return target(*args, **kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        """Proxies that know their example values."""
        return _ConcreteProxy(node, self)

    def _value(self, a: Any) -> Any:
        """The example value of a call argument (a Proxy's, or the literal)."""
        return self.values[a.node] if isinstance(a, fx.Proxy) else a

    def fixed(self, obj: fx.Proxy, use: str) -> Any:
        """The example value of ``obj``, used as ``use`` by Python (a branch, an index, a length): refused when it
        could change with the input (a value computed from it, or a length along the batch dimension)."""
        value = self.values[obj.node]
        batch_length = use == "a length" and isinstance(value, torch.Tensor)
        if (obj.node in self.input_dependent and use != "a length") or batch_length:
            raise PhotosimError(f"{obj.node.name} at {source_line(obj.node)}: a tensor value used as {use} in Python "
                                "(it could change with the input); photosim runs graphs fixed at capture. Rewrite "
                                "it without Python control flow (e.g. torch.where), or compute it outside the model.")
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        """``if proxy:`` on the example's value, when the input cannot change it."""
        return bool(self.fixed(obj, "a condition"))

    def iter(self, obj: fx.Proxy) -> Any:
        """Iterating the pieces of a split / chunk (a fixed number): one getitem node each."""
        return iter([obj[i] for i in range(len(self.fixed(obj, "a length")))])
