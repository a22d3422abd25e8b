"""Model zoo: the architectures ``dynlrp coverage --zoo`` iterates.

Every entry is a :class:`ZooEntry`; ``ZOO`` maps its name to it.  ``entry.build(full=False)``
returns ``(model, args, kwargs)``: the model in eval mode with random weights (built from a
config / constructor, never downloaded) and example inputs with batch size 2.  Building is
deterministic (``torch.manual_seed(0)`` before the weights, fixed generators for the inputs).

API::

    from dynlrp_fx import zoo
    zoo.names()                 # all entry names, in registration order
    zoo.names(paper_only=True)  # the 15 architectures of the DynamicLRP paper
    entry = zoo.get("gpt2")     # KeyError listing the valid names if unknown
    model, args, kwargs = entry.build()          # tiny default
    ep = zoo.export_entry(entry)                 # export (dynamic batch) + decompositions
    y = zoo.select_output(model(*args, **kwargs), entry.output)  # the tensor to explain

Entries are tiny (hidden 16-64, mostly 1 layer, vocab 256, images 32x32 or 64x64, audio 1600
samples) so building + exporting one takes about 1-3 s on two CPU cores; the whole
``tests/test_zoo_build.py`` must stay under ~2.5 minutes.  ``full=True`` builds the real-size
configuration (paper entries and several others; ignored elsewhere) and is only for slow
tests: the paper's VGG16, ResNet-50 and the torchvision convnets marked "real architecture"
below are the real networks already in the default entry (on a small input), ``full`` then only
switches the input to 224x224.

Export contract (checked by ``tests/test_zoo_build.py`` for every entry)::

    batch = torch.export.Dim("batch", min=1)
    # dim 0 of every tensor input (ndim >= 1) -> batch; bound through inspect.signature(forward)
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=..., strict=False)
    ep = ep.run_decompositions(default_decompositions() minus the two SDPA entries)

:func:`export_entry` does exactly this (:func:`batch_dynamic_shapes`,
:func:`decomposition_table`).

Input conventions
-----------------
* batch size 2, never 1 (export specialises sizes 0 and 1);
* text: integer ``input_ids`` (ids >= 3, clear of special tokens); encoders also get an
  ``attention_mask`` whose sample 1 has its last 2 positions padded; encoder-decoders get
  ``decoder_input_ids`` too;
* vision: ``pixel_values`` (transformers) or one positional image tensor (torchvision);
* audio: ``input_values`` (raw waveform, wav2vec2 family) or ``input_features``
  (log-mel: Whisper);
* multimodal: ``input_ids`` and ``pixel_values`` (CLIP), SigLIP-2's NaFlex patches
  (``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``; sample 1 is a smaller image
  with padded patches), Pix2Struct's ``flattened_patches`` + mask + ``decoder_input_ids``;
* library defaults: configs are the library's defaults with only size fields (and the named
  checkpoint's architecture choices) set, and no runtime flag is passed (``use_cache``,
  ``return_dict``, ``attn_implementation``...): generative models return their key/value cache,
  which the explainer leaves out, and attention is what transformers picks (SDPA where the
  model supports it, else eager).

How to add an entry
-------------------
* transformers: one call of ``hf(...)`` in ``_transformers.py``::

      hf("my_model", "text", "MyModelForCausalLM", "MyModelConfig",
         dict(vocab_size=V, hidden_size=32, ...),      # tiny config kwargs
         dec_text(),                                   # or enc_text(), seq2seq(), pixels(), audio(), custom fn
         full=dict(...))                               # optional: real-size config kwargs

  ``inputs(config, full) -> (args, kwargs)``; ``make_config(config_cls, kw)`` builds nested
  configs (see CLIP); ``post(model)`` may shrink a model whose depth a config cannot set.
* torchvision (or any ``nn.Module``): ``_tv(name, make_tiny, full=make_full, size=32)`` in
  ``_torchvision.py``; other families: build a ``ZooEntry`` and call :func:`register`.
* then run ``pytest tests/test_zoo_build.py -q --durations=10``: the entry must export with a
  symbolic batch dim and stay tiny (fix failures through config choices first; document any
  workaround in the list below).

Entries needing workarounds (and why)
-------------------------------------
* ``vit_b_16`` (paper): default is torchvision's ``VisionTransformer`` class at a tiny size
  (32x32 image, patch 8, 2 layers, hidden 32: ViT's position embedding fixes the image size);
  ``full=True`` is the real ``vit_b_16`` (224x224).
* ``efficientnet_v2_m`` (paper): the real network takes ~10 s to export + decompose on 2
  cores, so the default is torchvision's ``EfficientNet`` class with V2-M's block types
  (Fused-MBConv stages, then MBConv+SE, 1x1 head) at tiny depth; ``full=True`` is the real
  ``efficientnet_v2_m``.  Likewise ``densenet``, ``mobilenet_v2``, ``mobilenet_v3``,
  ``shufflenet_v2``, ``efficientnet``, ``regnet``, ``resnext``, ``wide_resnet``, ``convnext``,
  ``swin``, ``maxvit`` are tiny instances of the torchvision classes (``full``: the named
  real-size model).
* ``mixtral``: the library's default experts (``grouped_mm``) run on CPU through the custom op
  ``torch.ops.transformers.grouped_mm_fallback``, which the trace goes through (its composite
  implementation).  ``router_jitter_noise=0``.
* ``mamba`` (paper): without the CUDA kernels (``mamba_ssm``, ``causal_conv1d``) transformers
  runs the reference PyTorch scan (sequential loop over the 8 time steps, unrolled by export);
  that is the path exported here (full=True, mamba-130m: 24 layers x 16 steps unrolled, export +
  decompositions ~100 s on CPU).
* ``mobilevit``: MobileViT hard-codes its per-stage depths (2/4/3 transformer layers, several
  MobileNet blocks); a ``post`` hook keeps the first block of each stage so that it exports in
  a few seconds (``full=True``: unmodified mobilevit-small config).
* ``pix2struct_deplot`` (paper): the vision config's ``patch_embed_hidden_size`` must equal
  ``patch_size**2 * 3`` (48 for 4x4 patches); inputs are generated like the processor's
  (row/col ids from 1, padded patches zero with mask 0).  ``is_vqa=True`` as in DePlot.
* ``siglip2`` (paper): the NaFlex position-embedding resize is export-friendly in this
  transformers version (no ``.tolist()``), so the real ``Siglip2Model`` is used with
  per-sample ``spatial_shapes``.
* ``flan_t5`` full: transformers 5's ``T5Config`` always ties ``lm_head`` to the shared embedding
  (``tie_word_embeddings=False`` only switches off the decoder-output scaling, as in T5 v1.1), so
  the full model has 223M parameters instead of flan-t5-base's 248M; the graph is the same.
* eager attention (transformers' default where it has no SDPA): ``bloom``, ``deberta_v2``,
  ``mpnet``, ``wavlm``; attention-free / custom attention: ``mamba``, ``convnextv2``,
  ``mobilevit``.
* dropped to keep ``tests/test_zoo_build.py`` within its time budget (all of them exported
  fine with the helpers above, ~1.5-6 s each): LeViT (its eval-mode attention-bias cache is also
  a Python dict filled during forward), Speech2Text, HF Swinv2, YOLOS, torchvision swin_v2 /
  GoogLeNet / MNASNet / Wide-ResNet (GoogLeNet and MNASNet cannot be made smaller through their
  constructors), and near-duplicates of kept entries' code: XLM-R and Data2VecText (RoBERTa),
  mBART and Pegasus (BART / Marian), Qwen2 / StableLM / Gemma (Llama, Qwen3, Gemma-3), CodeGen
  (GPT-J), Data2VecAudio (wav2vec2).  Re-adding one costs ~2 s of test time.
"""

from . import (
    _torchvision,  # noqa: F401,E402  (registers the torchvision entries)
    _transformers,  # noqa: F401,E402  (registers the transformers entries)
)
from ._core import (  # noqa: F401
    BATCH,
    ZOO,
    ZooEntry,
    batch_dynamic_shapes,
    decomposition_table,
    export_entry,
    get,
    names,
    register,
    select_output,
)

PAPER_NAMES = (
    "vgg16", "resnet50", "vit_b_16", "efficientnet_v2_m", "siglip2", "wav2vec2", "whisper", "gpt2",
    "roberta", "llama3_2", "gemma3", "qwen3", "flan_t5", "pix2struct_deplot", "mamba",
)

__all__ = [
    "BATCH", "ZOO", "ZooEntry", "PAPER_NAMES", "batch_dynamic_shapes", "decomposition_table", "export_entry",
    "get", "names", "register", "select_output",
]
