"""Random-weight `transformers` checkpoints for every backend role, built offline from config
classes and saved as local folders (tests, the CPU benchmark). `size="tiny"` gives models
that run in well under a second per call on a CPU; `size="default"` uses the configs'
defaults (the published architectures' sizes: SAM ViT-B, Grounding DINO Swin-T, SAM 2
Hiera) with random weights, for timing only.
"""

from __future__ import annotations

import json
import os

_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ".",
    ",",
    "the",
    "a",
    "an",
    "pick",
    "up",
    "put",
    "place",
    "move",
    "open",
    "close",
    "push",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "block",
    "cup",
    "bowl",
    "plate",
    "drawer",
    "can",
    "sponge",
    "towel",
    "banana",
    "on",
    "in",
    "into",
    "to",
    "of",
    "and",
    "near",
    "number",
    "object",
    "instruction",
    "name",
    "robot",
    "first",
    "grasps",
]


def save_word_tokenizer(path: str, bert: bool) -> None:
    """Writes a word-level fast tokenizer of the test vocabulary (BERT-style with `bert`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from pixelvla_jax.annotate.hf_backends import import_transformers

    tr = import_transformers()
    digits = [str(i) for i in range(10)]
    vocab = {w: i for i, w in enumerate(list(dict.fromkeys(_WORDS + digits)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    fast = tr.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]" if bert else None,
        sep_token="[SEP]" if bert else None,
        eos_token="[SEP]",
        bos_token="[CLS]",
    )
    fast.save_pretrained(path)


def _save(model, path: str, preprocessor: dict | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if preprocessor is not None:
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f)
    return path


def sam2_video_config(size: str = "tiny"):
    from pixelvla_jax.annotate.hf_backends import import_transformers

    tr = import_transformers()
    if size == "default":
        return tr.Sam2VideoConfig()
    s = 128  # image side; the memory attention's key width (64) is fixed in transformers
    vision = dict(
        model_type="sam2_vision_model",
        backbone_config=dict(
            model_type="sam2_hiera_det_model",
            hidden_size=16,
            num_attention_heads=1,
            image_size=[s, s],
            blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 1, 1, 1],
            window_size_per_stage=[4, 4, 4, 4],
            global_attention_blocks=[3],
            window_positional_embedding_background_size=[4, 4],
        ),
        backbone_channel_list=[128, 64, 32, 16],
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        fpn_hidden_size=128,
    )
    return tr.Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(
            hidden_size=128, image_size=s, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=dict(
            hidden_size=128,
            mlp_dim=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
        ),
        image_size=s,
        memory_attention_hidden_size=128,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=128,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128,
        memory_fuser_intermediate_dim=64,
        num_maskmem=2,
    )


def save_video_segmenter(path: str, size: str = "tiny") -> str:
    from pixelvla_jax.annotate.hf_backends import import_torch, import_transformers

    import_torch().manual_seed(0)
    model = import_transformers().Sam2VideoModel(sam2_video_config(size))
    return _save(model, path)


def save_detector(path: str, size: str = "tiny") -> str:
    from pixelvla_jax.annotate.hf_backends import import_torch, import_transformers

    tr = import_transformers()
    import_torch().manual_seed(0)
    if size == "default":
        cfg = tr.GroundingDinoConfig()
        vocab = 30522
        pre = None
    else:
        vocab = len(dict.fromkeys(_WORDS)) + 10
        cfg = tr.GroundingDinoConfig(
            backbone_config=dict(
                model_type="swin",
                embed_dim=16,
                depths=[1, 1, 1, 1],
                num_heads=[1, 1, 1, 1],
                window_size=4,
                image_size=64,
                out_indices=[2, 3, 4],
                out_features=["stage2", "stage3", "stage4"],
            ),
            text_config=dict(
                model_type="bert",
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            num_queries=10,
            encoder_layers=1,
            decoder_layers=2,  # transformers ties bbox heads across decoder layers: needs >= 2
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            d_model=32,
            max_text_len=32,
            encoder_n_points=2,
            decoder_n_points=2,
        )
        pre = {"size": {"shortest_edge": 128, "longest_edge": 192}}
    model = tr.GroundingDinoForObjectDetection(cfg)
    _save(model, path, pre)
    save_word_tokenizer(path, bert=True)  # word-level: covers the test/bench queries
    return path


def save_segmenter(path: str, size: str = "tiny") -> str:
    from pixelvla_jax.annotate.hf_backends import import_torch, import_transformers

    tr = import_transformers()
    import_torch().manual_seed(0)
    if size == "default":
        cfg = tr.SamConfig()
    else:
        cfg = tr.SamConfig(
            vision_config=dict(
                hidden_size=32,
                output_channels=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=128,
                patch_size=16,
                window_size=4,
                global_attn_indexes=[1],
                num_pos_feats=16,
                mlp_dim=64,
            ),
            prompt_encoder_config=dict(
                hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4
            ),
            mask_decoder_config=dict(
                hidden_size=32,
                mlp_dim=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                iou_head_hidden_dim=32,
            ),
        )
    return _save(tr.SamModel(cfg), path)


def save_llm(path: str, size: str = "tiny") -> str:
    from pixelvla_jax.annotate.hf_backends import import_torch, import_transformers

    tr = import_transformers()
    import_torch().manual_seed(0)
    vocab = len(dict.fromkeys(_WORDS)) + 10
    if size == "default":  # a ~1B-parameter Llama-style model (TinyLlama-1.1B's shape)
        cfg = tr.LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
    else:
        cfg = tr.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    _save(tr.LlamaForCausalLM(cfg), path)
    save_word_tokenizer(path, bert=False)
    return path


def save_all(root: str, size: str = "tiny") -> dict[str, str]:
    """Writes the four role models under `root`; returns {role: folder}."""
    return {
        "video_segmenter": save_video_segmenter(os.path.join(root, "sam2_video"), size),
        "detector": save_detector(os.path.join(root, "grounding_dino"), size),
        "segmenter": save_segmenter(os.path.join(root, "sam"), size),
        "llm": save_llm(os.path.join(root, "llm"), size),
    }
