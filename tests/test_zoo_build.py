"""Every zoo entry builds, exports with a symbolic batch dim (non-strict, dynamic batch),
survives the decompositions and produces finite outputs; for the paper entries the exported
program's output also matches the eager model's.  Hugging Face entries keep the library's
defaults (no ``use_cache``/``return_dict``/``output_*`` flag in their inputs or configs), so
generative ones return their key/value cache, which ``zoo.export_entry`` leaves out.  Budget:
~2.5 min on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch
from torch.export.graph_signature import InputKind, TensorArgument

from dynlrp_fx import zoo

PAPER = {
    "vgg16", "resnet50", "vit_b_16", "efficientnet_v2_m", "siglip2", "wav2vec2", "whisper", "gpt2",
    "roberta", "llama3_2", "gemma3", "qwen3", "flan_t5", "pix2struct_deplot", "mamba",
}

#: flags that change what a Hugging Face model returns; the zoo leaves them at the library's defaults
RUNTIME_FLAGS = {"use_cache", "return_dict", "output_attentions", "output_hidden_states"}


def test_registry():
    assert len(zoo.ZOO) >= 40
    assert PAPER <= set(zoo.ZOO)
    assert set(zoo.names(paper_only=True)) == PAPER == set(zoo.PAPER_NAMES)
    assert zoo.names() == list(zoo.ZOO)
    for name, entry in zoo.ZOO.items():
        assert isinstance(entry, zoo.ZooEntry) and entry.name == name
        assert entry.modality in {"vision", "text", "audio", "multimodal", "sequence"}
        assert entry.family in {"torchvision", "transformers"}
        assert entry.paper == (name in PAPER)
    with pytest.raises(KeyError, match="gpt2"):  # the message lists the valid names
        zoo.get("no_such_model")


def _user_tensor_inputs(ep):
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument):
            val = nodes[spec.arg.name].meta["val"]
            if val.ndim >= 1:
                out.append((spec.arg.name, val))
    return out


@pytest.mark.parametrize("name", zoo.names())
def test_build_and_export(name):
    entry = zoo.get(name)
    model, args, kwargs = entry.build()
    assert isinstance(model, torch.nn.Module) and not model.training
    tensors = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    assert tensors and all(t.shape[0] == zoo.BATCH for t in tensors if t.ndim >= 1)

    if entry.family == "transformers":  # the library's defaults: no runtime flag passed or set in the config
        assert not RUNTIME_FLAGS & set(kwargs), f"{name}: example inputs set {sorted(RUNTIME_FLAGS & set(kwargs))}"
        default = type(model.config)()
        for flag in RUNTIME_FLAGS:
            assert getattr(model.config, flag, None) == getattr(default, flag, None), f"{name}: config sets {flag}"

    with torch.no_grad():
        ref = zoo.select_output(model(*args, **kwargs), entry.output)
    assert ref.shape[0] == zoo.BATCH
    assert torch.isfinite(ref).all(), f"{name}: non-finite output"

    ep = zoo.export_entry(entry, built=(model, args, kwargs))

    inputs = _user_tensor_inputs(ep)
    assert inputs, "no tensor user input in the exported program"
    first = inputs[0][1].shape[0]
    assert isinstance(first, torch.SymInt), f"{name}: batch dim of {inputs[0][0]} was specialised to {first}"
    for pname, val in inputs:  # all inputs share the one batch symbol
        assert str(val.shape[0]) == str(first), f"{name}: {pname} batch dim {val.shape[0]} != {first}"

    if entry.paper:  # the exported program computes what the model does (paper entries only: time)
        with torch.no_grad():
            got = zoo.select_output(ep.module()(*args, **kwargs), entry.output)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "gpt2", "clip"])
def test_build_is_deterministic(name):
    m1, a1, k1 = zoo.get(name).build()
    torch.manual_seed(123)  # the global RNG state must not matter
    m2, a2, k2 = zoo.get(name).build()
    for (n1, t1), (n2, t2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    flat1, flat2 = torch.utils._pytree.tree_leaves((a1, k1)), torch.utils._pytree.tree_leaves((a2, k2))
    assert len(flat1) == len(flat2)
    for x, y in zip(flat1, flat2):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
