import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def grad_x_input(model, x, target):
    """Gradient x input of output[:, target] (a reference for LRP-0 on piecewise-linear nets)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    sel = y.reshape(y.shape[0], -1)[torch.arange(y.shape[0]), target]
    (g,) = torch.autograd.grad(sel.sum(), x)
    return (g * x).detach()


def tiny_bert(model_cls: str = "BertForSequenceClassification", *, sdpa: bool = False, **config):
    """A tiny BERT from a config with random weights (eval mode); ``config`` overrides the defaults below."""
    import transformers

    cfg = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32, num_labels=3)
    cfg.update(config)
    cls = getattr(transformers, model_cls)
    bert_config = transformers.BertConfig(**cfg)
    model = cls._from_config(bert_config, attn_implementation="sdpa") if sdpa else cls(bert_config)
    return model.eval()
