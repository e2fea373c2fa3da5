"""Hugging Face transformers models built from a config (random weights, no download) on integers: ViT from pixel
values, BERT from token embeddings; the engine equals fake-quant; token-id lookups and control flow on tensor values
are refused by node and source line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import photosim
from photosim.errors import PhotosimError
from photosim.frontend.capture import capture
from photosim.frontend.hf import Logits
from photosim.frontend.models import load_model
from photosim.ir.fakequant import fake_quant_forward

transformers = pytest.importorskip("transformers")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10,
                                    attn_implementation="eager")
    return transformers.ViTForImageClassification(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, num_labels=3,
                                     attn_implementation="eager")
    return transformers.BertForSequenceClassification(config).eval()


def assert_engine_matches_fake_quant(model: nn.Module, x: torch.Tensor) -> None:
    """W8A8 on 32 inputs: the engine's logits within one output step of fake-quant, top-1 equal on >= 90%."""
    qm = photosim.quantize(model, x, {"w_bits": 8, "a_bits": 8})
    out, reference = photosim.simulate(qm, x), fake_quant_forward(qm, x)
    assert (out - reference).abs().max() <= 1.01 * qm.node(qm.output).output_q.scale
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_vit_from_a_config_captures_exactly_and_runs_on_the_engine() -> None:
    model, x = tiny_vit(), torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    graph = capture(model, x[:1])  # the bare model: capture takes its logits
    assert torch.allclose(graph.run(x), model(pixel_values=x).logits, atol=1e-5)
    ops = {n.op for n in graph.nodes}
    assert {"conv2d", "layer_norm", "matmul", "softmax", "table", "concat", "constant"} <= ops  # patches .. GELU
    assert_engine_matches_fake_quant(Logits(model), x)


def test_bert_runs_from_its_token_embeddings() -> None:
    model = tiny_bert()
    ids = torch.randint(0, 100, (32, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(ids)
    wrapped = Logits(model, "inputs_embeds")
    assert torch.allclose(capture(wrapped, embeddings[:1]).run(embeddings), model(input_ids=ids).logits, atol=1e-5)
    assert_engine_matches_fake_quant(wrapped, embeddings)


def test_bert_token_ids_are_refused_by_the_embedding_and_its_line() -> None:
    model, ids = tiny_bert(), torch.randint(0, 100, (4, 16))
    where = r"model\.bert\.embeddings\.word_embeddings \(Embedding: a lookup by integer token ids.*modeling_bert\.py"
    with pytest.raises(PhotosimError, match=where):
        capture(model, ids[:1])
    with pytest.raises(PhotosimError, match=where):  # quantize feeds float ids: refused the same way
        photosim.quantize(model, ids)


def test_control_flow_on_tensor_values_is_refused_with_its_line() -> None:
    class Output:
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    class Branchy(nn.Module):
        main_input_name = "pixel_values"

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, pixel_values: torch.Tensor) -> Output:
            batch, features = pixel_values.shape  # metadata: resolved on the example
            if pixel_values.sum() > 0:  # data: refused
                pixel_values = -pixel_values
            return Output(self.linear(pixel_values.reshape(batch, features)))

    where = r"gt at File .*test_hf\.py\", line \d+, in forward: a tensor value used as a condition"
    with pytest.raises(PhotosimError, match=where):
        capture(Logits(Branchy()), torch.randn(1, 4))


def test_hf_model_specs() -> None:
    loaded = load_model("hf:BertForSequenceClassification", num_classes=2)
    assert isinstance(loaded.module, Logits) and loaded.module.input_name == "inputs_embeds"
    assert loaded.input_shape == (512, 768) and loaded.module.model.config.num_labels == 2
    with pytest.raises(PhotosimError, match="transformers has no model class 'NoSuchModel'"):
        load_model("hf:NoSuchModel")
