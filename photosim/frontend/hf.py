"""Hugging Face ``transformers`` models on photosim: the logits of a model built from a config, as one input tensor
to one output tensor, traced by photosim.frontend.concrete_trace (transformers 5 ships no fx tracer of its own any
more, and its models branch in Python on ``pixel_values.dtype`` and unpack ``x.shape``, which plain
``torch.fx.symbolic_trace`` refuses). The transformers package is photosim's ``hf`` extra.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from photosim._imports import import_extra
from photosim.errors import PhotosimError

EMBEDDINGS_INPUT = "inputs_embeds"  # what a text model reads instead of token ids (the lookup left to the host)


def embedding_refusal(name: str, line: str) -> str:
    """Why an embedding lookup of the input (token ids) cannot run, and what to quantize instead."""
    return (f"{name} (Embedding: a lookup by integer token ids, which photosim's one quantized input cannot carry; "
            "look the embeddings up on the host and quantize the model from them, for a transformers model "
            f"photosim.frontend.hf.Logits(model, '{EMBEDDINGS_INPUT}')) at {line}")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (recognised without importing transformers)."""
    return any(cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
               for cls in type(model).__mro__)


class Logits(nn.Module):
    """A transformers model as photosim runs it: one input tensor (the model's ``main_input_name``, pixel values, or
    ``inputs_embeds``: token embeddings looked up on the host) to the ``logits`` of the output object it returns.

    Example:
        >>> qm = photosim.quantize(Logits(vit), images)  # doctest: +SKIP
        >>> qm = photosim.quantize(Logits(bert, "inputs_embeds"), bert.get_input_embeddings()(ids))  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, input_name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.input_name = input_name or model.main_input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.input_name: x}).logits


def build(class_name: str, num_classes: int | None) -> tuple[Logits, tuple[int, ...] | None]:
    """``hf:CLASS``: a transformers model class built from its default config (random weights, eager attention,
    ``num_classes`` labels when given) as Logits, and its per-sample input shape (C, H, W) for an image model,
    (positions, hidden) of token embeddings for a text model."""
    transformers = import_extra("transformers", "hf", f"model hf:{class_name}")
    model_class = getattr(transformers, class_name, None)
    if not isinstance(model_class, type) or getattr(model_class, "config_class", None) is None:
        raise PhotosimError(f"transformers has no model class {class_name!r}; name one built from a config, e.g. "
                            "hf:ViTForImageClassification, or build a small one in a file (path/to/file.py:NAME).")
    overrides: dict[str, Any] = {"num_labels": num_classes} if num_classes is not None else {}
    model = model_class(model_class.config_class(attn_implementation="eager", **overrides))  # attention as matmuls
    config = model.config
    if model.main_input_name == "pixel_values":
        size = getattr(config, "image_size", None)
        height, width = (size, size) if isinstance(size, int) else (size or (None, None))
        shape = (config.num_channels, height, width) if height else None
        return Logits(model.eval()), shape
    if model.main_input_name == "input_ids":
        return Logits(model.eval(), EMBEDDINGS_INPUT), (config.max_position_embeddings, config.hidden_size)
    raise PhotosimError(f"hf:{class_name} reads {model.main_input_name!r}; photosim builds transformers models that "
                        "read pixel_values or input_ids (as their embeddings).")

