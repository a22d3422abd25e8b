"""Benchmark models (random weights, built from configs: nothing is downloaded) and their inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BenchModel", "MODELS", "build", "sizes_for"]


@dataclass
class BenchModel:
    """A model ready to benchmark.

    ``make_inputs(batch)`` returns ``(args, kwargs)`` for the model; ``embed`` (transformers) maps those inputs to
    ``(embeddings, forward_from_embeddings)`` so that gradient x input can differentiate w.r.t. the token
    embeddings (the input whose relevance the explainer reports for token ids).
    """

    name: str
    kind: str  # "cnn" | "transformer"
    model: nn.Module
    make_inputs: Callable[[int], tuple[tuple, dict]]
    size: str  # human-readable input size, e.g. "3x64x64" or "seq 32"
    embed: Callable[[tuple, dict], tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] | None = None
    notes: list[str] = field(default_factory=list)


def _image_inputs(res: int, device: torch.device) -> Callable[[int], tuple[tuple, dict]]:
    def make(batch: int) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(batch)
        return (torch.randn(batch, 3, res, res, generator=g).to(device),), {}

    return make


def _vision(name: str, res: int, device: torch.device) -> BenchModel:
    import torchvision

    torch.manual_seed(0)
    if name == "vgg16":
        model = torchvision.models.vgg16()
    elif name == "resnet50":
        model = torchvision.models.resnet50()
    elif name == "vit_b_16":
        model = torchvision.models.vit_b_16(image_size=res)
        # torchvision zero-initialises the classification head: every logit and every relevance would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    else:
        raise ValueError(name)
    model = model.eval().to(device)
    return BenchModel(name, "cnn" if name != "vit_b_16" else "vit", model, _image_inputs(res, device), f"3x{res}x{res}")


def _text(name: str, seq: int, device: torch.device) -> BenchModel:
    import transformers as tf

    # the library's default configs and attention (SDPA for all three), only the sizes set: generative models keep
    # use_cache=True and return their key/value cache, which the explainer leaves out
    torch.manual_seed(0)
    if name == "bert_base":
        cfg = tf.BertConfig(num_labels=2)  # bert-base-uncased shapes
        model = tf.BertForSequenceClassification._from_config(cfg)
    elif name == "gpt2_small":
        cfg = tf.GPT2Config()  # gpt2 (124M) shapes
        model = tf.GPT2LMHeadModel._from_config(cfg)
    elif name == "llama_8l":
        cfg = tf.LlamaConfig(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=512,
        )
        model = tf.LlamaForCausalLM._from_config(cfg)
    else:
        raise ValueError(name)
    model = model.eval().to(device)
    vocab = model.config.vocab_size
    with_mask = name == "bert_base"

    def make(batch: int) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(batch)
        kw: dict[str, Any] = {"input_ids": torch.randint(3, vocab, (batch, seq), generator=g).to(device)}
        if with_mask:
            kw["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=device)
        return (), kw

    def embed(args: tuple, kwargs: dict):
        kw = dict(kwargs)
        ids = kw.pop("input_ids")
        emb = model.get_input_embeddings()(ids)

        def fwd(e: torch.Tensor) -> torch.Tensor:
            return model(inputs_embeds=e, **kw).logits

        return emb, fwd

    return BenchModel(name, "transformer", model, make, f"seq {seq}", embed=embed)


MODELS = ("vgg16", "resnet50", "vit_b_16", "bert_base", "gpt2_small", "llama_8l")


def sizes_for(device: str, quick: bool) -> dict[str, Any]:
    """Input sizes and batches per mode: GPU (full), CPU full, CPU quick."""
    if device == "cuda":
        return {"res": 224, "vit_res": 224, "seq": 128, "batches": [1, 16]}
    if quick:
        return {"res": 64, "vit_res": 64, "seq": 32, "batches": [1]}
    return {"res": 224, "vit_res": 224, "seq": 128, "batches": [1, 4]}


def build(name: str, device: torch.device, sizes: dict[str, Any]) -> BenchModel:
    """Build benchmark model ``name`` (one of :data:`MODELS`) on ``device`` with the given sizes."""
    if name in ("vgg16", "resnet50"):
        return _vision(name, sizes["res"], device)
    if name == "vit_b_16":
        return _vision(name, sizes["vit_res"], device)
    if name in ("bert_base", "gpt2_small", "llama_8l"):
        return _text(name, sizes["seq"], device)
    raise ValueError(f"unknown benchmark model {name!r}; choose from {MODELS}")
