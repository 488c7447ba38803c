"""The questions the compiler asks a model family, with the answers of the plain layout."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..runtime import CompileError, Tokens

if TYPE_CHECKING:  # pragma: no cover
    from ...ir.plan import Plan
    from ...models.spec import ModelSpec
    from ..installer import Installer
    from ..llm import LlmRuntime


class TowerExtras:
    """What a merge-unit tower computes besides its patch embedding, blocks and merger
    (`vtdsl.compiler.merge_units`): a family's answer (`Family.unit_tower_extras`); this
    base adds nothing. Qwen3-VL adds learned position embeddings before the blocks and
    DeepStack features after them."""

    def embed(self, x: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The patch embeddings `x` (``[N, d]``, the processor's patch order) before block 0."""
        return x

    def after_block(self, i: int, x: torch.Tensor, tokens: Tokens) -> None:
        """Block `i`'s output ``[G, k, m², d]`` over the units `tokens` present there."""

    def output(self, out: Any, tokens: Tokens, units: int) -> Any:
        """The tower's output `out`, given the units `tokens` its merger read (of `units`
        per image)."""
        return out


class Family:
    """Everything about one family of models the compiler needs beyond the towers' shapes.

    A family owns where the parts of its models live (module paths), how one image becomes
    the LLM's visual tokens (crops, newline tokens, a patch merger, position streams), which
    forward argument carries each image's size, and the rewrites its layout needs beyond
    the generic hooks. The compiler core asks it; it never tests spec fields that stand for
    a family. One instance per family, chosen once by `ModelSpec.family` (`family_of`).

    The defaults describe the plain layout (LLaVA-1.5): every image the same size, one
    crop, the projector's tokens in the vision tower's raster order, 1-D positions.

    Attributes
    ----------
    name : str
        The `ModelSpec.family` value the registry gives this family's specs.
    size_argument : str or None
        The forward argument that carries each image's size when its token count depends
        on it (``image_sizes``, ``image_grid_thw``); None: every image gives the same count.
    video_argument : str or None
        The forward argument that carries each video's size (``video_grid_thw``); None:
        the family's compiled models take no video.
    layout_fields : tuple of str
        `ModelSpec` fields, besides the towers' shapes, that a plan checked for one spec
        must share with the model it is installed on.
    vit_attention : str
        The attention module of a ViT layer, whose ``q_proj`` / ``k_proj`` / ``v_proj``
        ViT scores capture (``self_attn``; InternViT: ``attention``).
    norms_heads_first : bool
        Whether the LLM's per-head q/k norms (when it has them) are applied to
        ``[B, heads, n, dh]`` (after the heads are moved ahead of the tokens) rather than
        ``[B, n, heads, dh]``: how a score's hook on their output joins the heads again.
    """

    name: ClassVar[str]
    size_argument: ClassVar[str | None] = None
    video_argument: ClassVar[str | None] = None
    layout_fields: ClassVar[tuple[str, ...]] = ()
    norms_heads_first: ClassVar[bool] = False
    vit_attention: ClassVar[str] = "self_attn"

    def __repr__(self) -> str:
        return f"<vtdsl family {self.name}>"

    # ------------------------------------------------------------------ module paths
    def multimodal_path(self, spec: ModelSpec) -> str:
        """The model that encodes images and merges them into the prompt (``model``)."""
        return spec.llm_layer_path.split(".")[0]

    def language_model_path(self, spec: ModelSpec) -> str:
        """The decoder stack whose layers `llm_layer_path` names."""
        return spec.llm_layer_path.format(i=0).rpartition(".")[0].rpartition(".")[0]

    def encoder_path(self, spec: ModelSpec) -> str:
        """The vision encoder whose layer loop ViT stages are traced into."""
        return spec.vit_layer_path.format(i=0).rpartition(".")[0].rpartition(".")[0]

    # ------------------------------------------------------------------ image sizes
    @property
    def sized_per_image(self) -> bool:
        """Whether an image's visual token count depends on its size (the compiled model
        then re-resolves the plan for each call's images, `vtdsl.compiler.layouts`)."""
        return self.size_argument is not None

    def image_sizes(self, spec: ModelSpec, kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """(height, width) in pixels of each image of one forward call, read from its
        `size_argument`; None when the call carries none (or the family has none)."""
        return None

    def size_rows(self, kwargs: dict[str, Any], width: int) -> list[list[int]] | None:
        """The call's `size_argument` as one row of `width` integers per image (a tensor or,
        as transformers also accepts, nested lists); None when the call carries none."""
        value = kwargs.get(self.size_argument) if self.size_argument else None
        if value is None:
            return None
        return torch.as_tensor(value).reshape(-1, width).tolist()

    def video_spec(self, spec: ModelSpec, kwargs: dict[str, Any]) -> ModelSpec | None:
        """`spec` with the counts of the video a call's `video_argument` sizes (one video
        layout per call), or None when the call carries none (or the family takes none)."""
        return None

    def sized_spec(self, spec: ModelSpec, height: int, width: int) -> ModelSpec:
        """`spec` with the counts of one image of a call, `(height, width)` as
        `image_sizes` gave it (here: the image as the user passed it)."""
        return spec.for_image(height, width)

    def layout_key(self, spec: ModelSpec) -> tuple:
        """What tells two per-image specs' token layouts apart (equal keys: one plan)."""
        return ()

    # ------------------------------------------------------------------ token layout
    def llm_tokens(self, spec: ModelSpec, images: int, per_image: int, device: torch.device,
                   vit_tokens: Tokens | None, *, intact: bool) -> Tokens:
        """Identities of the visual tokens the LLM receives: `per_image` for each of
        `images` images (batch x images per sample). `vit_tokens`: the vision tower's
        bookkeeping of what it handed the projector, when ViT stages ran; `intact`: the
        plan leaves the projector's output as the unpruned model has it."""
        if vit_tokens is not None and images:
            return vit_tokens.expand_to(images)
        if spec.video_frames and per_image == spec.image_tokens:
            return Tokens.video(images, spec.vit_crops, spec.llm_grid, device, newline=spec.video_newline)
        keeps_cls = spec.has_cls and spec.select_strategy == "full"
        return Tokens.initial(images, spec.llm_grid, device, keeps_cls)

    def trimmed_tokens(self, spec: ModelSpec, tokens: Tokens, images: int, per_image: int,
                       device: torch.device) -> Tokens:
        """The LLM's visual tokens `tokens` once the padding rows of an adaptive ViT count
        are removed at its input, `per_image` left of each of `images` images."""
        return tokens

    # ------------------------------------------------------------------ installation
    def check(self, plan: Plan, features_vary: bool) -> None:
        """Refuse, with a `CompileError`, a plan the layout cannot run although it passed
        the checks (`features_vary`: adaptive ViT counts change the features per call)."""

    def install(self, installer: Installer, plan: Plan) -> None:
        """The family's own rewrites between the projector and the LLM (none here); each
        goes through `installer` so that it is listed and undone."""

    @staticmethod
    def reads_vit(plan: Plan) -> bool:
        """Whether a plan has ViT stages or ViT scores (planned for an image's crops or
        patches, which a video's frames would run through unplanned)."""
        return any(s.site.tower == "vit" for s in plan.stages) or any(o.tower == "vit" for o in plan.observations)

    def refuse_video(self, installer: Installer, plan: Plan, why: str, what: str) -> None:
        """Make the model's `get_video_features` raise a `CompileError` saying `why` (listed
        as `what`): for plans whose stages cannot take a video's frames."""
        owner_path = self.multimodal_path(plan.spec)
        original = getattr(installer.model.get_submodule(owner_path), "get_video_features", None)
        if original is None:
            return

        @functools.wraps(original)  # generate() reads its signature to pick the encoder's inputs
        def get_video_features(*_, **__):
            raise CompileError(why)

        installer.override(owner_path, "get_video_features", get_video_features, "method-override", what)

    def install_llm(self, installer: Installer, plan: Plan, runtime: LlmRuntime | None) -> None:
        """The family's own rewrites inside the language model that must follow the rows
        LLM stages keep (none here), e.g. features the model adds to the visual tokens
        between layers; `runtime` (None without LLM hooks) says which prompt positions the
        rows hold (`LlmRuntime.prompt_rows`)."""

    def unit_tower_extras(self, plan: Plan, visual: torch.nn.Module) -> TowerExtras | None:
        """What the family's merge-unit tower `visual` computes besides patch embedding,
        blocks and merger when ViT stages replace its forward (`vtdsl.compiler.merge_units`);
        None: nothing."""
        return None
