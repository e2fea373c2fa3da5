"""torchvision's Swin Transformer as photosim nodes: shifted-window attention and patch merging (both fx-wrapped
functions in torchvision/models/swin_transformer.py, so they arrive as one call each).

The batch stays dimension 0 throughout: torchvision merges the batch with the windows, (B * windows, tokens, C);
here the windows are a dimension of their own, (B, windows, tokens, C), and attention's matmuls are batched over
(windows, heads). Shifts are rolls of codes, the relative position bias and the shift mask one stored constant.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from photosim.errors import PhotosimError
from photosim.frontend.graph import FloatNode


class _Nodes(list):
    """The nodes of one decomposition, named ``<call>.<suffix>``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def add(self, suffix: str, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
            weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> str:
        self.append(FloatNode(f"{self.name}.{suffix}", op, inputs, attrs or {}, weight, bias))
        return self[-1].name

    def finish(self) -> list[FloatNode]:
        """The nodes, the last renamed as the call (it holds the call's output)."""
        self[-1].name = self.name
        return list(self)


def patch_merging_nodes(name: str, source: str, call: fx.Node) -> list[FloatNode]:
    """``_patch_merging_pad`` on (B, H, W, C): zero padding to even H and W, then the 2x2 neighbourhoods' tokens
    concatenated in torchvision's order (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) as a reshape to
    (H/2, 2, W/2, 2, C), a permute to (H/2, W/2, 2 (w), 2 (h), C) and a reshape to (H/2, W/2, 4C)."""
    shape = call.args[0].meta["tensor_meta"].shape
    if len(shape) != 4:
        raise PhotosimError(f"{name}: patch merging of a {len(shape)}-d input; photosim takes (B, H, W, C).")
    h, w, c = (int(d) for d in shape[1:])
    nodes = _Nodes(name)
    x = _pad(nodes, source, (h, w), (h + h % 2, w + w % 2))
    h, w = h + h % 2, w + w % 2
    grid = nodes.add("grid", "reshape", [x], {"shape": [h // 2, 2, w // 2, 2, c]})
    pairs = nodes.add("pairs", "permute", [grid], {"dims": [0, 1, 3, 4, 2, 5]})
    nodes.add("merged", "reshape", [pairs], {"shape": [h // 2, w // 2, 4 * c]})
    return nodes.finish()


def _pad(nodes: _Nodes, source: str, sizes: tuple[int, int], padded: tuple[int, int]) -> str:
    """Zeros after the end of dimensions 1 and 2 (H, W) up to ``padded``, as torchvision's F.pad adds them."""
    for axis, (size, target) in enumerate(zip(sizes, padded)):
        if target > size:
            source = nodes.add(f"pad_{axis + 1}", "pad", [source], {"dim": axis + 1, "before": 0,
                                                                     "after": target - size})
    return source


def shift_mask(height: int, width: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """(windows, tokens, tokens): 0 between tokens of one region of the shifted map, -100 between tokens of different
    regions (torchvision's ``shifted_window_attention``, whose construction this repeats)."""
    regions = torch.zeros(height, width)
    bounds = [((0, -window[i]), (-window[i], -shift[i]), (-shift[i], None)) for i in range(2)]
    for count, ((h0, h1), (w0, w1)) in enumerate((h, w) for h in bounds[0] for w in bounds[1]):
        regions[h0:h1, w0:w1] = count
    regions = regions.view(height // window[0], window[0], width // window[1], window[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, window[0] * window[1])
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differ.masked_fill(differ != 0, -100.0).masked_fill(differ == 0, 0.0)


def window_attention_nodes(name: str, source: str, call: fx.Node, value: Callable[[Any], Any]) -> list[FloatNode]:
    """``shifted_window_attention`` on (B, H, W, C): zero padding to whole windows, roll, window partition, qkv
    linear, per-head q, k, v, the scores (v1: q k^T / sqrt(d); v2: cosines of L2-normalized q and k times the
    per-head temperature) plus the position bias (and the shift mask) as one constant, softmax, the weighted sum of
    v, heads merged, the output linear, windows merged, rolled back and cut to the unpadded size.
    ``value`` gives an argument's value (a folded constant's, or the literal)."""
    bound = inspect.signature(call.target).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    a = {key: value(v) for key, v in bound.arguments.items() if key != "input"}
    h, w, c = (int(d) for d in call.args[0].meta["tensor_meta"].shape[1:])
    window, heads = [int(s) for s in a["window_size"]], int(a["num_heads"])
    padded = tuple(size + (-size) % win for size, win in zip((h, w), window))
    shift = [0 if window[i] >= size else int(a["shift_size"][i]) for i, size in enumerate(padded)]
    grid, tokens, dim = (padded[0] // window[0], padded[1] // window[1]), window[0] * window[1], c // heads
    windows = grid[0] * grid[1]
    cosine = a["logit_scale"] is not None  # Swin v2: cosine attention with a learned per-head temperature
    nodes = _Nodes(name)
    x = _pad(nodes, source, (h, w), padded)
    for axis, s in enumerate(shift):
        if s:
            x = nodes.add(f"shift_{axis + 1}", "roll", [x], {"dim": axis + 1, "shift": -s % padded[axis]})
    x = nodes.add("grid", "reshape", [x], {"shape": [grid[0], window[0], grid[1], window[1], c]})
    x = nodes.add("windows", "permute", [x], {"dims": [0, 1, 3, 2, 4, 5]})
    x = nodes.add("tokens", "reshape", [x], {"shape": [windows, tokens, c]})
    qkv_bias = (a["qkv_bias"] if a["qkv_bias"] is not None else torch.zeros(3 * c)).detach().clone()
    if cosine:
        qkv_bias[c:2 * c] = 0  # torchvision zeroes the key bias of v2
    x = nodes.add("qkv", "linear", [x], {"in_features": c, "out_features": 3 * c},
                  a["qkv_weight"].detach().clone(), qkv_bias)
    x = nodes.add("qkv_heads", "reshape", [x], {"shape": [windows, tokens, 3, heads, dim]})
    parts = {}
    for i, part in enumerate("qkv"):
        piece = nodes.add(part, "slice", [x], {"dim": 3, "start": i, "stop": i + 1})
        piece = nodes.add(f"{part}_heads", "reshape", [piece], {"shape": [windows, tokens, heads, dim]})
        if cosine and part != "v":
            piece = nodes.add(f"{part}_normalized", "l2_normalize", [piece], {"eps": 1e-12})  # F.normalize's eps
        order = [0, 1, 3, 4, 2] if part == "k" else [0, 1, 3, 2, 4]  # k as (windows, heads, d, T): scores = q @ k
        parts[part] = nodes.add(f"{part}_t", "permute", [piece], {"dims": order})
    if cosine:
        scores = nodes.add("cosines", "matmul", [parts["q"], parts["k"]])
        temperature = torch.clamp(a["logit_scale"].detach(), max=math.log(100.0)).exp().reshape(1, heads, 1, 1)
        temperature = nodes.add("temperature", "constant", ["input"], {"shape": [1, heads, 1, 1]},
                                temperature.float().clone())
        scores = nodes.add("scores", "mul", [scores, temperature])
    else:
        q = nodes.add("q_scaled", "scale", [parts["q"]], {"factor": dim ** -0.5})
        scores = nodes.add("scores", "matmul", [q, parts["k"]])  # (windows, heads, T, T) per sample
    bias = a["relative_position_bias"].detach().reshape(1, heads, tokens, tokens)
    if any(shift):
        bias = bias + shift_mask(*padded, window, shift).unsqueeze(1)
    bias = bias.expand(windows, heads, tokens, tokens).float().clone()
    bias = nodes.add("position_bias", "constant", ["input"], {"shape": list(bias.shape)}, bias)
    x = nodes.add("biased", "add", [scores, bias])
    x = nodes.add("weights", "softmax", [x])
    x = nodes.add("context", "matmul", [x, parts["v"]])  # (windows, heads, T, d)
    x = nodes.add("merged", "permute", [x], {"dims": [0, 1, 3, 2, 4]})
    x = nodes.add("context_tokens", "reshape", [x], {"shape": [windows, tokens, c]})
    proj_bias = a["proj_bias"] if a["proj_bias"] is not None else torch.zeros(c)
    x = nodes.add("proj", "linear", [x], {"in_features": c, "out_features": c}, a["proj_weight"].detach().clone(),
                  proj_bias.detach().clone())
    x = nodes.add("window_grid", "reshape", [x], {"shape": [grid[0], grid[1], window[0], window[1], c]})
    x = nodes.add("unwindowed", "permute", [x], {"dims": [0, 1, 3, 2, 4, 5]})
    x = nodes.add("map", "reshape", [x], {"shape": [*padded, c]})
    for axis, s in enumerate(shift):
        if s:
            x = nodes.add(f"unshift_{axis + 1}", "roll", [x], {"dim": axis + 1, "shift": s % padded[axis]})
    for axis, size in enumerate((h, w)):
        if padded[axis] > size:
            x = nodes.add(f"unpad_{axis + 1}", "slice", [x], {"dim": axis + 1, "start": 0, "stop": size})
    return nodes.finish()
