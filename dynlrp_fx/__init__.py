"""dynlrp-fx: Layer-wise Relevance Propagation for any PyTorch model, as a torch.fx graph compiler.

>>> import dynlrp_fx as dynlrp                                   # doctest: +SKIP
>>> explainer = dynlrp.compile(model, example_inputs, rules="epsilon")  # doctest: +SKIP
>>> expl = explainer(x, target=3)                                  # doctest: +SKIP
>>> expl.relevance, expl.conservation                              # doctest: +SKIP
"""

from . import evaluate, presets, targets
from .coverage import coverage
from .dataset import attribute_dataset, load_shards, merge_shards, top_samples
from .errors import (
    DynlrpDatasetError,
    DynlrpError,
    DynlrpInputError,
    DynlrpInternalError,
    DynlrpLoadError,
    DynlrpShapeError,
    DynlrpTraceError,
    DynlrpUnsupportedOpError,
)
from .evaluate import select_rules
from .explainer import Conservation, Explainer, Explanation, compile
from .export import export, load
from .generation import GenerationExplanation, explain_generation
from .rules import Composite, Rule, register_op

__version__ = "0.1.0"

__all__ = [
    "compile",
    "coverage",
    "export",
    "load",
    "Explainer",
    "Explanation",
    "Conservation",
    "Composite",
    "Rule",
    "register_op",
    "presets",
    "targets",
    "explain_generation",
    "GenerationExplanation",
    "evaluate",
    "select_rules",
    "attribute_dataset",
    "merge_shards",
    "load_shards",
    "top_samples",
    "DynlrpError",
    "DynlrpDatasetError",
    "DynlrpInputError",
    "DynlrpInternalError",
    "DynlrpShapeError",
    "DynlrpLoadError",
    "DynlrpTraceError",
    "DynlrpUnsupportedOpError",
    "__version__",
]
