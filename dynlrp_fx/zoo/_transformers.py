"""Hugging Face ``transformers`` entries of the zoo (random weights, built from configs)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ._core import BATCH, ZooEntry, register

# -----------------------------------------------------------------------------------------
# input helpers (deterministic: own generator, independent of the weight-init RNG)
# -----------------------------------------------------------------------------------------


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(vocab: int, length: int, seed: int = 1, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (BATCH, length), generator=_gen(seed))


def _mask(length: int, pad: int = 2) -> torch.Tensor:
    """All ones except the last ``pad`` positions of sample 1 (right padding)."""
    m = torch.ones(BATCH, length, dtype=torch.long)
    m[1, length - pad:] = 0
    return m


def _pixels(size, channels: int = 3, seed: int = 2) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(BATCH, channels, h, w, generator=_gen(seed))


def _wave(samples: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, samples, generator=_gen(seed))


def enc_text(length: int = 8, vocab_attr: str = "vocab_size", token_type_ids: bool = False):
    def inputs(cfg, full):
        n = 16 if full else length
        kw = {"input_ids": _ids(getattr(cfg, vocab_attr), n), "attention_mask": _mask(n)}
        if token_type_ids:
            kw["token_type_ids"] = torch.zeros(BATCH, n, dtype=torch.long)
        return (), kw

    return inputs


def dec_text(length: int = 8, vocab_attr: str = "vocab_size"):
    def inputs(cfg, full):
        n = 16 if full else length
        return (), {"input_ids": _ids(getattr(cfg, vocab_attr), n)}

    return inputs


def seq2seq(length: int = 8, dec_length: int = 6, vocab=None):
    def inputs(cfg, full):
        v = vocab(cfg) if vocab else cfg.vocab_size
        n, m = (16, 8) if full else (length, dec_length)
        return (), {
            "input_ids": _ids(v, n),
            "attention_mask": _mask(n),
            "decoder_input_ids": _ids(v, m, seed=4),
        }

    return inputs


def pixels(size: int | None = None, attr: str = "image_size", key: str = "pixel_values"):
    def inputs(cfg, full):
        s = getattr(cfg, attr) if (full or size is None) else size
        return (), {key: _pixels(s)}

    return inputs


def audio(samples: int = 1600, full_samples: int = 16000):
    def inputs(cfg, full):
        return (), {"input_values": _wave(full_samples if full else samples)}

    return inputs


# -----------------------------------------------------------------------------------------
# registration helper
# -----------------------------------------------------------------------------------------


def hf(name: str, modality: str, model_cls: str, config_cls: str, tiny: dict, inputs: Callable,
       full: dict | None = None, paper: bool = False, output: str | None = None,
       make_config: Callable | None = None, post: Callable | None = None):
    """Register a transformers model.

    ``tiny``/``full`` are keyword dicts for ``config_cls`` (``full`` missing: the flag is
    ignored): the library's default config with only size fields (and the architecture
    choices of the named checkpoint) set, never runtime flags such as ``use_cache``,
    ``return_dict`` or ``attn_implementation``, so every entry runs as the library builds it
    (SDPA attention where transformers supports it, eager elsewhere; the key/value cache of
    generative models in their output). ``make_config(config_cls, kwargs)`` may build nested
    configs. ``inputs(config, full) -> (args, kwargs)``. ``post(model)`` may shrink the built
    tiny model in place (only applied when not ``full``).
    """

    def build(full: bool = False):
        import transformers

        torch.manual_seed(0)
        ccls = getattr(transformers, config_cls)
        kw = copy.deepcopy(full_cfg if (full and full_cfg is not None) else tiny)
        config = make_config(ccls, kw) if make_config else ccls(**kw)
        model = getattr(transformers, model_cls)._from_config(config)
        if post is not None and not (full and full_cfg is not None):
            post(model)
        model.eval()
        args, kwargs = inputs(config, bool(full and full_cfg is not None))
        return model, args, kwargs

    full_cfg = full
    build.__name__ = f"build_{name}"
    build.__qualname__ = build.__name__
    return register(ZooEntry(name=name, modality=modality, family="transformers", build=build,
                             paper=paper, output=output))


# common tiny sizes
V = 256  # vocab
ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=64, num_labels=2)
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
S2S = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
           pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=64, num_labels=10)
W2V = dict(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
           conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
           num_conv_pos_embedding_groups=2, num_labels=2, classifier_proj_size=16)


# =========================================================================================
# DynamicLRP paper architectures (transformers part: 11 of the 15)
# =========================================================================================

hf("gpt2", "text", "GPT2LMHeadModel", "GPT2Config",
   dict(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=V - 1, eos_token_id=V - 1),
   dec_text(), full=dict(), paper=True)  # GPT2Config() defaults = gpt2 (124M)

hf("roberta", "text", "RobertaForSequenceClassification", "RobertaConfig",
   dict(ENC, pad_token_id=1, type_vocab_size=1),
   enc_text(), paper=True,
   full=dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
             bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, num_labels=2))

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, high_freq_factor=4.0,
                    low_freq_factor=1.0, original_max_position_embeddings=8192)
hf("llama3_2", "text", "LlamaForCausalLM", "LlamaConfig",
   dict(DEC, head_dim=8, tie_word_embeddings=True,
        rope_parameters=dict(_LLAMA3_ROPE, original_max_position_embeddings=64)),
   dec_text(), paper=True,
   full=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
             rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE,
             bos_token_id=128000, eos_token_id=128001))

hf("gemma3", "text", "Gemma3ForCausalLM", "Gemma3TextConfig",
   dict(DEC, num_hidden_layers=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"]),
   dec_text(), paper=True,
   full=dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
             sliding_window=512, max_position_embeddings=32768))  # gemma-3-1b-pt

hf("qwen3", "text", "Qwen3ForCausalLM", "Qwen3Config",
   dict(DEC, head_dim=8, tie_word_embeddings=True),
   dec_text(), paper=True,
   full=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
             tie_word_embeddings=True))  # Qwen3-0.6B

_T5_TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
hf("flan_t5", "text", "T5ForConditionalGeneration", "T5Config", _T5_TINY, seq2seq(), paper=True,
   full=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
             num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False))  # flan-t5-base


def _pix2struct_config(ccls, kw):
    return ccls(text_config=kw["text"], vision_config=kw["vision"], **kw.get("top", {}))


def _pix2struct_inputs(cfg, full):
    vc = cfg.vision_config
    n = 64 if full else 16  # number of patches (max_patches)
    side = int(n ** 0.5)
    g = _gen(2)
    feats = torch.randn(BATCH, n, vc.patch_embed_hidden_size, generator=g)  # = patch_size**2 * channels
    r = torch.arange(n) // side + 1  # row / col ids start at 1 (0 = padding)
    c = torch.arange(n) % side + 1
    rc = torch.stack([r, c], -1).float().expand(BATCH, n, 2)
    flattened = torch.cat([rc, feats], -1)
    mask = torch.ones(BATCH, n)
    mask[1, n - 3:] = 0
    flattened[1, n - 3:] = 0
    return (), {"flattened_patches": flattened, "attention_mask": mask,
                "decoder_input_ids": _ids(cfg.text_config.vocab_size, 8 if full else 6, seed=4)}


hf("pix2struct_deplot", "multimodal", "Pix2StructForConditionalGeneration", "Pix2StructConfig",
   dict(text=dict(vocab_size=V, hidden_size=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16),
        vision=dict(hidden_size=32, patch_embed_hidden_size=48, d_ff=64, d_kv=8, num_hidden_layers=1,
                    num_attention_heads=4, seq_len=16, patch_size=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16),
        top=dict(is_vqa=True)),
   _pix2struct_inputs, paper=True, make_config=_pix2struct_config,
   full=dict(text={}, vision={}, top=dict(is_vqa=True)))  # defaults = pix2struct-base (DePlot's size)

hf("mamba", "sequence", "MambaForCausalLM", "MambaConfig",
   dict(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=1, expand=2, conv_kernel=4),
   dec_text(), paper=True,  # attention-free; CPU runs the reference (slow) scan
   full=dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24))  # mamba-130m


def _clip_inputs(cfg, full):
    vc, tc = cfg.vision_config, cfg.text_config
    n = 16 if full else 8
    ids = _ids(tc.vocab_size - 1, n)  # eos = vocab_size - 1 closes each (unpadded part of the) sequence
    ids[0, -1] = tc.eos_token_id
    ids[1, -3] = tc.eos_token_id  # sample 1: 2 padded positions
    return (), {"input_ids": ids, "attention_mask": _mask(n), "pixel_values": _pixels(vc.image_size)}


def _dual_config(ccls, kw):
    return ccls(text_config=kw["text"], vision_config=kw["vision"], **kw.get("top", {}))


def _siglip2_inputs(cfg, full):
    vc, tc = cfg.vision_config, cfg.text_config
    n = 16 if full else 8
    num_patches = vc.num_patches
    side = int(num_patches ** 0.5)
    pv = torch.randn(BATCH, num_patches, vc.num_channels * vc.patch_size ** 2, generator=_gen(2))
    pmask = torch.ones(BATCH, num_patches, dtype=torch.long)
    shapes = torch.tensor([[side, side]] * BATCH, dtype=torch.long)
    # sample 1: a smaller (side x side-1) image, last patches padded
    shapes[1] = torch.tensor([side, side - 1])
    pmask[1, side * (side - 1):] = 0
    pv[1, side * (side - 1):] = 0
    # SigLIP's text tower is trained with max-length padding (no text mask)
    return (), {"input_ids": _ids(tc.vocab_size, n), "pixel_values": pv, "pixel_attention_mask": pmask,
                "spatial_shapes": shapes}


hf("siglip2", "multimodal", "Siglip2Model", "Siglip2Config",
   dict(text=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_patches=16, patch_size=8)),
   _siglip2_inputs, paper=True, output="logits_per_image", make_config=_dual_config,
   full=dict(text=dict(vocab_size=256000), vision=dict(num_patches=256, patch_size=16)))  # base-patch16-naflex

hf("wav2vec2", "audio", "Wav2Vec2ForCTC", "Wav2Vec2Config", W2V, audio(), paper=True,
   full=dict(vocab_size=32))  # Wav2Vec2Config() defaults = wav2vec2-base


def _whisper_inputs(cfg, full):
    frames = 2 * cfg.max_source_positions
    feats = torch.randn(BATCH, cfg.num_mel_bins, frames, generator=_gen(3))
    return (), {"input_features": feats, "decoder_input_ids": _ids(cfg.vocab_size, 8 if full else 6, seed=4)}


hf("whisper", "audio", "WhisperForConditionalGeneration", "WhisperConfig",
   dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        decoder_start_token_id=2, begin_suppress_tokens=None, suppress_tokens=None),
   _whisper_inputs, paper=True,
   full=dict(vocab_size=51865, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
             decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=80))  # tiny

# =========================================================================================
# more transformers architectures
# =========================================================================================

# --- text encoders -----------------------------------------------------------------------
hf("bert", "text", "BertForSequenceClassification", "BertConfig", ENC, enc_text(token_type_ids=True))
hf("distilbert", "text", "DistilBertForSequenceClassification", "DistilBertConfig",
   dict(vocab_size=V, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=2),
   enc_text())
hf("albert", "text", "AlbertForSequenceClassification", "AlbertConfig", dict(ENC, embedding_size=16),
   enc_text())
hf("deberta_v2", "text", "DebertaV2ForSequenceClassification", "DebertaV2Config",
   dict(ENC, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
        max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True),
   enc_text())  # no SDPA support in transformers: the library's default is eager attention
hf("electra", "text", "ElectraForSequenceClassification", "ElectraConfig", dict(ENC, embedding_size=16),
   enc_text())
hf("mpnet", "text", "MPNetForSequenceClassification", "MPNetConfig", dict(ENC, pad_token_id=1),
   enc_text())  # no SDPA support in transformers: eager attention

# --- decoders ----------------------------------------------------------------------------
hf("mistral", "text", "MistralForCausalLM", "MistralConfig", dict(DEC, head_dim=8, sliding_window=4), dec_text())
hf("mixtral", "text", "MixtralForCausalLM", "MixtralConfig",
   dict(DEC, head_dim=8, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0),
   dec_text())  # the library's grouped_mm experts: a custom op with a composite implementation, traced through
hf("phi3", "text", "Phi3ForCausalLM", "Phi3Config", dict(DEC, pad_token_id=0), dec_text())
hf("falcon", "text", "FalconForCausalLM", "FalconConfig",
   dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2, alibi=False), dec_text())
hf("gpt_neox", "text", "GPTNeoXForCausalLM", "GPTNeoXConfig",
   dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64), dec_text())
hf("opt", "text", "OPTForCausalLM", "OPTConfig",
   dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1), dec_text())
hf("persimmon", "text", "PersimmonForCausalLM", "PersimmonConfig",
   dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64), dec_text())
hf("gptj", "text", "GPTJForCausalLM", "GPTJConfig",
   dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=1, eos_token_id=2), dec_text())
hf("bloom", "text", "BloomForCausalLM", "BloomConfig",
   dict(vocab_size=V, hidden_size=32, n_layer=1, n_head=4), dec_text())  # no SDPA in transformers (ALiBi): eager
hf("olmo", "text", "OlmoForCausalLM", "OlmoConfig", DEC, dec_text())

# --- encoder-decoder text ------------------------------------------------------------------
hf("bart", "text", "BartForConditionalGeneration", "BartConfig", S2S, seq2seq())
hf("marian", "text", "MarianMTModel", "MarianConfig",
   dict(S2S, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, decoder_vocab_size=V), seq2seq())

def _mobilevit_shrink(model):
    """MobileViT hard-codes its per-stage depths (2/4/3 transformer layers, 1/3/2/... MobileNet
    blocks), which makes it ~4x slower to export than any other tiny entry: keep the first
    block of each stage (configs cannot express this)."""
    for m in model.modules():
        if type(m).__name__ in ("MobileViTTransformer", "MobileViTMobileNetLayer"):
            m.layer = m.layer[:1]


# --- vision --------------------------------------------------------------------------------
hf("vit", "vision", "ViTForImageClassification", "ViTConfig", VIT, pixels())
hf("deit", "vision", "DeiTForImageClassification", "DeiTConfig", VIT, pixels())
hf("beit", "vision", "BeitForImageClassification", "BeitConfig", dict(VIT, use_relative_position_bias=True),
   pixels())
hf("dinov2", "vision", "Dinov2ForImageClassification", "Dinov2Config", VIT, pixels())
hf("convnextv2", "vision", "ConvNextV2ForImageClassification", "ConvNextV2Config",
   dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=10), pixels(32))
hf("mobilevit", "vision", "MobileViTForImageClassification", "MobileViTConfig",
   dict(image_size=64, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2, num_labels=10), pixels(), post=_mobilevit_shrink,
   full=dict())  # MobileViTConfig() defaults = mobilevit-small
hf("segformer", "vision", "SegformerForImageClassification", "SegformerConfig",
   dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2],
        decoder_hidden_size=32, num_labels=10), pixels(64))

# --- multimodal ------------------------------------------------------------------------------
hf("clip", "multimodal", "CLIPModel", "CLIPConfig",
   dict(text=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=V - 1),
        vision=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2),
        top=dict(projection_dim=16)),
   _clip_inputs, output="logits_per_image", make_config=_dual_config)

# --- audio ---------------------------------------------------------------------------------
hf("hubert", "audio", "HubertForSequenceClassification", "HubertConfig", W2V, audio())
hf("wavlm", "audio", "WavLMForSequenceClassification", "WavLMConfig", dict(W2V, num_buckets=32),
   audio())  # no SDPA in transformers (gated relative position bias): eager
