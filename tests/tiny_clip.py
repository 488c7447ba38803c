"""A tiny random CLIP (text tower, tokenizer, visual projection) saved to a temporary
directory, for the `clip_text` scorer's auxiliary encoder: nothing is downloaded. Its
vision width is tiny-llava's (32), so its `visual_projection` reads tiny-llava's ViT
states. Building it imports transformers only (the conformance references use it)."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import torch

WIDTH = 32  # tiny-llava's ViT width
PROJECTION = 24
MAX_LENGTH = 77


@lru_cache(maxsize=None)
def tiny_clip(width: int = WIDTH, seed: int = 0) -> tuple[Path, torch.nn.Module, object]:
    """(directory, CLIPModel, tokenizer): a 2-layer text tower with a character-level
    CLIP tokenizer (every byte and byte + ``</w>`` a token, no merges); `width` is the
    vision width its `visual_projection` reads."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(tempfile.mkdtemp(prefix="vtdsl-tiny-clip-"))
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), projection_dim=PROJECTION)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    return path, model, tokenizer


def text_encoder_kwargs(policy: Path | str, question: str = "What is in the image?", width: int = WIDTH) -> dict:
    """``apply`` / ``compile`` keyword arguments for a policy: a loaded tiny text encoder
    asked `question` when the policy reads `clip_text`, else nothing; `width`: the vision
    width of the model it is applied to."""
    text = policy.read_text() if isinstance(policy, Path) else policy
    if "clip_text" not in text:
        return {}
    from vtdsl.compiler.text_encoder import TextEncoder

    encoder = TextEncoder.load(tiny_clip(width)[0])
    encoder.ask(question)
    return {"text_encoder": encoder}
