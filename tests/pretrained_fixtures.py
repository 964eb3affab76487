"""Random-weight pretrained-model folders in the real on-disk layouts, written offline.

* a transformers CLIPModel folder (``save_pretrained``) with a CLIP BPE tokenizer built from
  open_clip's bundled vocabulary (the same merges OpenAI's CLIP uses, so "$" is one token);
* a transformers SiglipModel folder with a word-level tokenizer built with ``tokenizers``
  (SigLIP's own tokenizer is SentencePiece, and the sentencepiece package is not installed);
* an open_clip Hugging Face folder (``open_clip_config.json`` + ``open_clip_model.safetensors``
  or ``open_clip_pytorch_model.bin``) with a non-default ``preprocess_cfg``.
Configs are small so that every test runs in seconds on a CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)


def clip_tokenizer():  # type: ignore[no-untyped-def]
    """transformers CLIPTokenizer with OpenAI CLIP's BPE (open_clip ships it), no download."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [tuple(pair) for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def write_hf_clip(folder: Path, seed: int = 0, tokenizer=None, weights: bool = True) -> Path:  # type: ignore[no-untyped-def]
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=16)
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    (tokenizer or clip_tokenizer()).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


SIGLIP_WORDS = ["a", "the", "photo", "of", "that", "is", "red", "blue", "green", "make", "it", "with",
                "circle", "square", "triangle", "large", "small", "left", "right", "and"]


def siglip_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level fast tokenizer (pad 0, eos 1, unk 2, "$" 3) that appends </s> like SigLIP's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "$": 3, **{w: i + 4 for i, w in enumerate(SIGLIP_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def write_hf_siglip(folder: Path, seed: int = 0) -> Path:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    n = len(SIGLIP_WORDS) + 4
    config = SiglipConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                         projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    model = SiglipModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    siglip_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPEN_CLIP_PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
                        "resize_mode": "squash"}


def write_open_clip_folder(folder: Path, seed: int = 0, fmt: str = "safetensors") -> Path:
    """An open_clip HF-hub folder: config + weights (safetensors, or a torch.save .bin)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG,
                                                              "preprocess_cfg": OPEN_CLIP_PREPROCESS}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "open_clip_model.safetensors"))
    elif fmt == "bin":
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


def write_open_clip_file(path: Path, model_name: str = "ViT-S-32", seed: int = 0) -> Path:
    """A random-weight open_clip state dict file for a built-in model name."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
