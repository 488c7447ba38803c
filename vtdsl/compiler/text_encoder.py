"""The auxiliary CLIP text tower that `clip_text` scores with (Recoverable Compression).

RC (banjiuyufen/Recoverable-Compression @ d9275944, llava/model/multimodal_encoder/
clip_encoder.py) encodes the question with CLIP's *text* model, which a LLaVA checkpoint
does not contain, and projects the vision tower's last hidden state with CLIP's
`visual_projection`, which LLaVA drops too. The user supplies both from one local CLIP
directory (``compile(..., text_encoder=DIR)``, ``vtdsl run --text-encoder DIR``): a
`CLIPModel` checkpoint (``openai/clip-vit-large-patch14-336`` for LLaVA-1.5, whose tower
LLaVA keeps frozen) with its tokenizer files.

The question reaches the tower explicitly: ``TextEncoder.ask(question)`` before a call
(``vtdsl run`` passes its ``--question``), one question per image or one for the batch.
RC instead decodes the prompt's text tokens and keeps the first line; with LLaVA-1.5's
chat template that line is the system prompt, so the question is passed as text here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .runtime import CompileError

CLIP_CONTEXT = 77  # CLIP's text positions


class TextEncoder:
    """A CLIP text tower with its tokenizer and the vision side's `visual_projection`.

    `ask` stores the questions' embeddings; `score` is RC's ``get_score_by_text``: the
    cosine of each projected patch with the question's embedding, times ``P ** -0.5``
    (P the projection width), as RC scales it.
    """

    def __init__(self, text_model: nn.Module, tokenizer, visual_projection: nn.Linear, max_length: int = CLIP_CONTEXT):
        self.text_model = text_model.eval()
        self.tokenizer = tokenizer
        self.visual_projection = visual_projection
        self.max_length = max_length
        self.embedding: Tensor | None = None

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu",
             max_length: int = CLIP_CONTEXT) -> "TextEncoder":
        """`CLIPTextModelWithProjection`, its tokenizer and ``visual_projection.weight``
        from a local CLIP directory (never the network)."""
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise CompileError(f"--text-encoder {directory}: no config.json there (a local CLIP model directory)")
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a CLIPModel's vision weights are "unexpected" for the text tower: expected
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            if hasattr(config, "text_config"):  # a whole CLIPModel: its projection width is the top-level one
                config.text_config.projection_dim = config.projection_dim
                config = config.text_config
            text_model = CLIPTextModelWithProjection.from_pretrained(path, config=config,
                                                                     local_files_only=True).to(device)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CompileError(f"--text-encoder {directory}: {str(exc).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        weight = _visual_projection(path)
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(device)
        with torch.no_grad():
            projection.weight.copy_(weight)
        return cls(text_model, tokenizer, projection, max_length)

    @torch.no_grad()
    def embed(self, questions: Sequence[str]) -> Tensor:
        """RC's text feature: the questions padded to `max_length`, the text model run
        without an attention mask, the last position's state through `text_projection`."""
        ids = self.tokenizer(list(questions), max_length=self.max_length, truncation=True, padding="max_length",
                             return_tensors="pt")["input_ids"]
        device = self.text_model.text_projection.weight.device
        out = self.text_model(input_ids=ids.to(device))
        return self.text_model.text_projection(out.last_hidden_state[:, -1, :]).float()

    def ask(self, questions: str | Sequence[str]) -> None:
        """The question(s) the next calls' `clip_text` scores compare the image with."""
        self.embedding = self.embed([questions] if isinstance(questions, str) else questions)

    @torch.no_grad()
    def score(self, hidden: Tensor) -> Tensor:
        """``[B, n, width]`` patch states -> ``[B, n]`` float32 RC text scores."""
        if self.embedding is None:
            raise CompileError("'clip_text' has no question: call TextEncoder.ask(question) before the model")
        text = self.embedding.to(hidden.device)
        if text.shape[0] not in (1, hidden.shape[0]):
            raise CompileError(f"'clip_text' was asked {text.shape[0]} questions for {hidden.shape[0]} images")
        proj = self.visual_projection(hidden.to(self.visual_projection.weight.dtype)).float()
        text = nn.functional.normalize(text, dim=-1)
        img = nn.functional.normalize(proj, dim=-1)
        return (img @ text[:, :, None])[..., 0] * proj.shape[-1] ** -0.5


def _visual_projection(path: Path) -> Tensor:
    """``visual_projection.weight`` ``[P, width]`` from the directory's safetensors."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith("visual_projection.weight")), None)
            if key is not None:
                return f.get_tensor(key).float()
    raise CompileError(f"--text-encoder {path}: no visual_projection.weight in its safetensors "
                       "(a CLIPModel or CLIPVisionModelWithProjection checkpoint has one)")


def clip_text_term(plan):
    """The first term of `plan` whose score reads `clip_text` (its span locates the
    refusal when no text encoder is given), or None."""
    for stage in plan.stages:
        for term in stage.terms:
            if term.score is not None and any(o.scorer == "clip_text" for o in term.score.observations()):
                return term
    return None


NEEDS_ENCODER = ("'clip_text' compares the patches with the question's CLIP text embedding, and {model} has no "
                 "CLIP text tower")


def as_text_encoder(value) -> TextEncoder | None:
    """A `TextEncoder`, or one loaded from a directory path; None stays None."""
    if value is None or isinstance(value, TextEncoder):
        return value
    return TextEncoder.load(value)
