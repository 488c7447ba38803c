"""What the passes, the cost model and the compiler need to know about a model.

A `ModelSpec` is plain data derived from a transformers config. Everything family
specific (CLS token or not, a 2x2 patch merger, anyres crops, M-RoPE) is a field here, or
a descriptive property of the fields (`packs_crops`, `position_streams`), so the IR passes
and the cost model never branch on the model's name; the compiler asks the family object
`vtdsl.compiler.families.family_of(spec)`, chosen by `family`.

Specs are made by `vtdsl.models.spec_from_config` (the one code path: built-ins, a user's
own config, a local model directory all go through it). Importing this module is free: it
does not import torch or transformers; `build` and `load_weights` do, lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # pragma: no cover
    import torch

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class TowerDims:
    """Shape of a transformer stack, enough for analytic FLOPs and KV bytes."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    # "gelu" MLPs have two matmuls (fc1, fc2); "swiglu" have three (gate, up, down).
    mlp: Literal["gelu", "swiglu"] = "gelu"

    @property
    def q_width(self) -> int:
        """Width of the query (and attention output) projection: heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of each of the key and value projections (GQA: kv_heads * head_dim)."""
        return self.kv_heads * self.head_dim

    @property
    def mlp_matmuls(self) -> int:
        return 3 if self.mlp == "swiglu" else 2


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a `ModelFamily.family` (vtdsl.models.families)
    description: str
    vit: TowerDims
    llm: TowerDims
    vocab_size: int
    image_size: int
    patch_size: int
    channels: int
    has_cls: bool
    vision_feature_layer: int  # as in the HF config, e.g. -2
    select_strategy: Literal["default", "full"]
    projector: tuple[int, ...]  # widths of the projector's linear layers, input first
    dtype: str = "float16"
    # Where sites live in the HF module tree ({i} = layer index).
    vit_layer_path: str = "model.vision_tower.encoder.layers.{i}"
    projector_path: str = "model.multi_modal_projector"
    llm_layer_path: str = "model.language_model.layers.{i}"
    # Builds the transformers config; kept as a callable so importing the registry is free.
    make_config: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    # --- fields added for the registry / compiler / cost model (all with defaults) ---
    image_token_id: int | None = None  # the placeholder id repeated once per visual token
    # transformers class that `build` instantiates (looked up in `transformers`).
    model_class: str = "LlavaForConditionalGeneration"
    attn_implementation: str = "sdpa"  # default for `build`; "eager" etc. allowed
    tie_word_embeddings: bool = False
    # Crops the vision tower encodes per image (LLaVA-NeXT anyres: base + grid crops).
    # `vit_tokens` in a Plan are per crop; projector / LLM counts are per image (all crops).
    vit_crops: int = 1
    # LLaVA-NeXT anyres: the crop grid (rows, cols) of the reference image every count is
    # for (the largest of the model's pinpoints, so counts are upper bounds), and whether a
    # learned newline token ends each row of the grid crops' feature map in the LLM.
    anyres_grid: tuple[int, int] | None = None
    image_newline: bool = False
    # The resolutions (height, width) anyres picks from, and, for one image, the part of
    # the grid crops' feature map that survives unpadding: (rows, cols, top, left); None
    # = all of it (the reference image fills its pinpoint).
    anyres_pinpoints: tuple[tuple[int, int], ...] = ()
    anyres_map: tuple[int, int, int, int] | None = None
    # "anyres_max_N" (LLaVA-OneVision): an unpadded map of more than 1.1^2 x N crops' tokens
    # is shrunk by bilinear interpolation to about N crops' worth; 0: never shrunk.
    anyres_max_crops: int = 0
    # Dynamic resolution (Qwen2.5-VL): the patch grid (rows, cols) of one image when it is
    # not the square `image_size` one; `for_image` sets it.
    image_grid: tuple[int, int] | None = None
    dynamic_resolution: bool = False
    # The processor's pixel range (dynamic resolution): `for_image` resizes an image's area
    # into [min_pixels, max_pixels], as the model's image processor does.
    min_pixels: int = 0
    max_pixels: int = 0
    # Video (dynamic resolution): the video processor's per-frame pixel range, and, once
    # `for_video` sized the spec, the frames of the video (0: an image). A video's frames
    # are grouped `temporal_patch` at a time; each group is one crop (`vit_crops`): the
    # ViT attends within a group only, and the LLM gets the groups' grids one after another.
    video_min_pixels: int = 0
    video_max_pixels: int = 0
    video_frames: int = 0
    # Fixed-size video frames (LLaVA-OneVision, LLaVA-NeXT-Video): the video processor brings
    # every frame to the tower's image size and each is encoded as one crop, its feature
    # grid then pooled `frame_pool` x `frame_pool` (0: the model takes no such video). A
    # bilinear resize to the sides rounded up after the projector (`frame_pool_ceil`;
    # OneVision), or an average / max pool rounding down before it (`frame_pool_first`;
    # NeXT-Video). `video_newline`: one learned newline token ends a video's frames.
    frame_pool: int = 0
    frame_pool_ceil: bool = False
    frame_pool_first: bool = False
    video_newline: bool = False
    # Frames one patch spans (Qwen2.5-VL's Conv3d patch embedding: 2; an image is repeated).
    temporal_patch: int = 1
    # Window attention (Qwen2.5-VL): tokens per window in every ViT layer not listed in
    # `vit_full_attention` (0: every layer attends over the whole crop).
    vit_window: int = 0
    vit_full_attention: tuple[int, ...] = ()
    # Side of the patch merge unit between ViT and projector (Qwen2.5-VL: 2 -> 2x2 patches
    # become one token; `projector[0]` is then vit.hidden * 4).
    spatial_merge: int = 1
    # DeepStack (Qwen3-VL): ViT layers whose outputs pass through their own merger (the
    # projector's widths) and are added to the visual tokens' hidden states after LLM layers
    # 0, 1, ... in this order (`deepstack_llm_layers`); (): none.
    deepstack_layers: tuple[int, ...] = ()
    # Position encoding of the LLM: "rope" (1-D) or "mrope" (Qwen2-VL style, 3 sections).
    position_encoding: Literal["rope", "mrope"] = "rope"
    # Image splitting (SmolVLM / Idefics3): the processor resizes an image's longest edge
    # to this many pixels, cuts it into `image_size` tiles and adds the image resized to one
    # tile as a global view (0: no splitting). The spec's own counts are for one tile;
    # `for_image` sets `vit_crops` to an image's tiles.
    split_edge: int = 0
    # Tiles matched to the aspect ratio (InternVL): the processor picks the rows x cols grid
    # of `image_size` tiles, with min <= rows·cols <= max, whose ratio is closest to the
    # image's, and adds a thumbnail tile when it cut more than one; (0, 0): no tiling. The
    # spec's own counts are for one tile; `for_image` sets `vit_crops` to an image's tiles.
    tile_range: tuple[int, int] = (0, 0)
    # The projector's input is already merged (InternVL's and SmolVLM's pixel shuffle,
    # Gemma 3's average pool run before the projector): a `vit.out` stage chooses among the
    # merged tokens (`llm_grid`, each of spatial_merge² patches), ViT scores summed over each
    # token's patches; a stage inside the tower keeps or drops whole groups (`vit_units`,
    # vtdsl.compiler.vit_groups).
    merged_features: bool = False
    # Pan-and-scan (Gemma 3) when the processor turns it on: (min crop side, max crops, min
    # aspect ratio); an image more elongated than the ratio is also cut into 2..max crops
    # along its long side, each encoded as one more view. None: off (the default). The
    # spec's own counts are for one view; `for_image` sets `vit_crops` to the views.
    pan_and_scan: tuple[int, int, float] | None = None
    # Checkpoint key renames (regex, replacement), first match wins: maps older / hub
    # checkpoint layouts onto this transformers version's module tree.
    checkpoint_renames: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # A local model directory this spec was read from (weights may live there).
    source: str | None = field(default=None, compare=False)
    # `build()` on a real device loads the trained weights in `source` instead of drawing
    # random ones (models shipped with trained weights: tiny-llava-vtbench).
    pretrained: bool = field(default=False, compare=False)

    @property
    def grid(self) -> tuple[int, int]:
        if self.image_grid is not None:
            return self.image_grid
        side = self.image_size // self.patch_size
        return side, side

    @property
    def patch_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def vit_tokens(self) -> int:
        """Tokens the ViT layers see: patches plus CLS when the tower has one."""
        return self.patch_tokens + (1 if self.has_cls else 0)

    @property
    def feature_layer_index(self) -> int:
        """Index of the ViT layer whose output becomes the image features."""
        return self.vision_feature_layer % (self.vit.layers + 1) - 1

    @property
    def unused_vit_layers(self) -> tuple[int, ...]:
        """ViT layers that run in transformers but whose output no one reads (e.g. the
        last layer when vision_feature_layer is -2)."""
        return tuple(range(self.feature_layer_index + 1, self.vit.layers))

    @property
    def llm_grid(self) -> tuple[int, int]:
        """Token grid of one crop as the LLM receives it (after a patch merger; a video
        frame's after its pool)."""
        rows, cols = self.grid
        if self.pools_frames:
            s = self.frame_pool
            return (-(-rows // s), -(-cols // s)) if self.frame_pool_ceil else (rows // s, cols // s)
        return rows // self.spatial_merge, cols // self.spatial_merge

    @property
    def pools_frames(self) -> bool:
        """Whether this spec is sized for a video whose frames are pooled one by one."""
        return bool(self.video_frames and self.frame_pool)

    @property
    def takes_video(self) -> bool:
        """Whether the model takes video input (`for_video`)."""
        return bool(self.video_max_pixels or self.frame_pool)

    @property
    def vit_units(self) -> int:
        """Patches a ViT-side stage keeps or drops together: `spatial_merge`² where each group
        becomes one LLM token and ViT stages choose among groups (merge units), counted in
        them; else 1. Two kinds: `packed_units` towers (Qwen-VL) hand their merger the units in
        their own sequence; merged-features ones (InternVL3, SmolVLM, Gemma 3) fuse each
        group of a tile's raster grid after the tower (pixel shuffle, pool)."""
        units = self.spatial_merge > 1 and (self.dynamic_resolution or self.merged_features)
        return self.spatial_merge**2 if units else 1

    @property
    def packed_units(self) -> bool:
        """Whether the tower itself lays each merge unit out as consecutive rows and merges
        them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: dynamic resolution, no pixel shuffle before the
        projector; DeepStack's mergers read the same units of inner blocks): its own block
        loop runs ViT stages (vtdsl.compiler.merge_units), the prompt keeps its placeholders."""
        return self.vit_units > 1 and not self.merged_features

    @property
    def projector_tokens(self) -> int:
        """Visual tokens entering the projector per image when nothing is pruned (merged
        units for a patch merger: Qwen2.5-VL's projector widths are 4 patches wide; a
        video frame's patches, or its pooled grid where the pool comes first)."""
        keeps_cls = self.has_cls and self.select_strategy == "full"
        rows, cols = self.grid if self.pools_frames and not self.frame_pool_first else self.llm_grid
        return (rows * cols + (1 if keeps_cls else 0)) * self.vit_crops

    def projector_input(self, features: int) -> int:
        """Visual tokens one image hands the projector, from the `features` one crop's
        feature layer (and vit.out stages) hands over, patches or merge units: merged in
        groups of spatial_merge x spatial_merge (Qwen2.5-VL), a video frame pooled first
        (NeXT-Video; ViT stages are refused on video, so every patch is there), CLS added
        back under the "full" strategy, times the crops (LLaVA-NeXT)."""
        keeps_cls = self.has_cls and self.select_strategy == "full"
        if self.pools_frames and self.frame_pool_first:
            merged = self.llm_grid[0] * self.llm_grid[1]
        elif self.merged_features or self.vit_units > 1:
            merged = features
        else:
            merged = features // self.spatial_merge**2
        return (merged + (1 if keeps_cls else 0)) * self.vit_crops

    @property
    def vit_window_pairs(self) -> int:
        """Σ over the attention windows of one image of (tokens in the window)²: windows are
        squares of `vit_window` patches tiling the merged grid from the top left, the last
        row and column of windows partial when the grid is not a multiple of them."""
        side = math.isqrt(self.vit_window) // self.spatial_merge  # merged tokens per window side
        unit = self.spatial_merge**2

        def runs(n: int) -> list[int]:
            return [side] * (n // side) + ([n % side] if n % side else [])

        rows, cols = self.llm_grid
        return sum((a * b * unit) ** 2 for a in runs(rows) for b in runs(cols))

    @property
    def unpadded_map(self) -> tuple[int, int, int, int]:
        """Anyres: (rows, cols, top, left) of the grid crops' feature map after unpadding."""
        if self.anyres_map is not None:
            return self.anyres_map
        rows, cols = self.llm_grid
        return self.anyres_grid[0] * rows, self.anyres_grid[1] * cols, 0, 0

    @property
    def crop_map(self) -> tuple[int, int, int, int]:
        """Anyres: (rows, cols, top, left) of the map the LLM receives: the unpadded map,
        shrunk under `anyres_max_crops` as transformers' `pack_image_features` does (the
        ratio's float test and the floor divisions are its own)."""
        rows, cols, top, left = self.unpadded_map
        if self.anyres_max_crops:
            ratio = math.sqrt(rows * cols / (self.anyres_max_crops * self.patch_tokens))
            if ratio > 1.1:
                return int(rows // ratio), int(cols // ratio), top, left
        return rows, cols, top, left

    @property
    def packs_crops(self) -> bool:
        """Whether the LLM receives each image's crops packed into one map (LLaVA-NeXT's
        anyres: the base view, then the grid crops' feature map unpadded, its rows ended by
        newline tokens) rather than the projector's tokens as they come, one grid per crop."""
        return self.anyres_grid is not None

    @property
    def position_streams(self) -> int:
        """Position ids the LLM's rotary embedding reads per token: 1 (RoPE), 3 (M-RoPE:
        time, row, column; a visual token's are not contiguous with its neighbours')."""
        return 3 if self.position_encoding == "mrope" else 1

    @property
    def deepstack_llm_layers(self) -> tuple[int, ...]:
        """LLM layers after whose output DeepStack adds a ViT layer's merged features to the
        visual tokens (the first `len(deepstack_layers)` layers)."""
        return tuple(range(len(self.deepstack_layers)))

    @property
    def image_tokens(self) -> int:
        """Visual tokens entering the LLM per image when nothing is pruned (the prompt's
        image placeholders): the projector's output; for packed crops, the base view plus
        the unpadded grid crops' map with one newline token ending each row."""
        if self.pools_frames:
            return self.llm_grid[0] * self.llm_grid[1] * self.vit_crops + (1 if self.video_newline else 0)
        if not self.packs_crops:
            return self.projector_tokens
        rows, cols, _, _ = self.crop_map
        return self.projector_tokens // self.vit_crops + rows * (cols + (1 if self.image_newline else 0))

    def for_image(self, height: int, width: int) -> "ModelSpec":
        """This spec with every count for one image of height x width pixels: the crops
        anyres picks and the unpadded map (LLaVA-NeXT, transformers' own resolution
        choice), the patch grid (dynamic resolution), or the tiles image splitting cuts
        (SmolVLM: `vit_crops`, counted together). Fixed-size models: itself."""
        from dataclasses import replace

        if self.packs_crops:
            from transformers.image_processing_utils import select_best_resolution

            best_h, best_w = select_best_resolution((height, width), [list(p) for p in self.anyres_pinpoints])
            grid = (best_h // self.image_size, best_w // self.image_size)
            side_r, side_c = self.llm_grid
            cur_h, cur_w = grid[0] * side_r, grid[1] * side_c
            rows, cols, top, left = cur_h, cur_w, 0, 0
            # LLaVA-NeXT's unpad rule: the padding the resize added, cut from both sides
            if width / height > cur_w / cur_h:
                pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
                rows, top = cur_h - 2 * pad, pad
            else:
                pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
                cols, left = cur_w - 2 * pad, pad
            return replace(self, anyres_grid=grid, vit_crops=1 + grid[0] * grid[1],
                           anyres_map=(rows, cols, top, left))
        if self.dynamic_resolution:
            # the size the processor resizes to (Qwen2-VL's smart_resize): sides rounded to
            # the merge unit, then the area brought into the processor's pixel range; the
            # clamp applies to every size, multiples of the unit included
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

            height, width = smart_resize(height, width, factor=self.patch_size * self.spatial_merge,
                                         min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            return self.for_grid(height // self.patch_size, width // self.patch_size)
        if self.split_edge:
            return replace(self, vit_crops=self._tiles(height, width))
        if self.pan_and_scan:
            return replace(self, vit_crops=1 + self.pan_and_scan_crops(height, width))
        if self.tile_range[1] > 1:
            rows, cols = self.matched_tiles(height, width)
            return replace(self, vit_crops=1 if rows * cols == 1 else rows * cols + 1)
        return self

    def matched_tiles(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the tile grid for an image, as transformers' GotOcr2 image
        processor (InternVL's) chooses it in `get_optimal_tiled_canvas`: among grids of
        `tile_range` tiles ordered by tile count, the first whose width/height ratio is
        closest to the image's; an equally close later grid wins while the image's area
        exceeds half of that grid's pixels."""
        low, high = self.tile_range
        grids = sorted(((c, r) for c in range(1, high + 1) for r in range(1, high + 1) if low <= c * r <= high),
                       key=lambda g: g[0] * g[1])
        ratio, area, best, best_diff = width / height, width * height, (1, 1), float("inf")
        for cols, rows in grids:
            diff = abs(ratio - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and area > 0.5 * self.image_size * self.image_size * cols * rows:
                best = (cols, rows)
        return best[1], best[0]

    def pan_and_scan_crops(self, height: int, width: int) -> int:
        """Crops pan-and-scan cuts from an image of height x width pixels, as transformers'
        Gemma 3 image processor does (`pan_and_scan`): none below the aspect ratio; else the
        ratio rounded half up, at most one per min crop side, 2 to max; none when a crop's
        short side would fall under the min crop side."""
        low, most, min_ratio = self.pan_and_scan
        long_side, short_side = max(height, width), min(height, width)
        if long_side / short_side < min_ratio:
            return 0
        crops = min(most, max(2, min(int(math.floor(long_side / short_side + 0.5)), long_side // low)))
        return 0 if min(math.ceil(long_side / crops), short_side) < low else crops

    def _tiles(self, height: int, width: int) -> int:
        """Crops image splitting makes of one image: rows x cols tiles and the global view,
        or the global view alone when the resized image fits one tile. The resize is
        transformers' SmolVLM processor's (image_processing_pil_smolvlm.py): the longest
        edge to `split_edge`, the other side truncated then made even, then both brought
        under 4096 pixels; each side is then rounded up to whole tiles."""
        ratio = width / height
        if width >= height:
            width, height = self.split_edge, int(self.split_edge / ratio)
            height += height % 2
        else:
            height, width = self.split_edge, int(self.split_edge * ratio)
            width += width % 2
        height, width = max(height, 1), max(width, 1)
        if width >= height and width > 4096:
            width, height = 4096, int(4096 / ratio)
        elif height > width and height > 4096:
            height, width = 4096, int(4096 * ratio)
        height, width = max(height, 1), max(width, 1)
        rows, cols = math.ceil(height / self.image_size), math.ceil(width / self.image_size)
        return 1 if rows * cols == 1 else rows * cols + 1

    def for_grid(self, rows: int, cols: int) -> "ModelSpec":
        """This spec for an image the processor already made `rows` x `cols` patches
        (dynamic resolution: a call's `image_grid_thw`, used as it is)."""
        from dataclasses import replace

        return replace(self, image_grid=(rows, cols))

    def for_video(self, frames: int, height: int, width: int) -> "ModelSpec":
        """This spec for a video of `frames` frames of height x width pixels. Dynamic
        resolution: every frame resized as the video processor does (its own pixel range),
        the frames padded with copies of the last to a whole number of temporal patches,
        each group of `temporal_patch` frames one crop of the resized grid. Fixed-size
        frames (`frame_pool`): each frame one crop at the tower's size, pooled."""
        from dataclasses import replace

        if not self.takes_video or frames < 1:
            raise ValueError(f"{self.name} takes no video input" if not self.takes_video
                             else f"a video of {frames} frames: expected at least 1 frame")
        if self.frame_pool:
            # every frame brought to the tower's size (OneVision resizes it, NeXT-Video
            # resizes and centre-crops), whatever its own: one crop a frame, no anyres
            return replace(self, anyres_grid=None, anyres_map=None, anyres_pinpoints=(), anyres_max_crops=0,
                           image_grid=None, vit_crops=frames, video_frames=frames)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        height, width = smart_resize(height, width, factor=self.patch_size * self.spatial_merge,
                                     min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels)
        groups = -(-frames // self.temporal_patch)
        return replace(self, image_grid=(height // self.patch_size, width // self.patch_size), vit_crops=groups,
                       video_frames=frames)

    def frames_refusal(self) -> str | None:
        """Why a policy may not name frames (`per frame`, temporal scores) on this spec, or
        None: a video's spec has frames; the unsized spec of a model that takes video is a
        plan for its videos (a compiled model re-checks each call for its layout, so an
        image call is refused then); an image, or a model without video, has none."""
        if self.video_frames:
            return None
        if not self.takes_video:
            return f"{self.name} takes no video input, so its visual tokens have no frames"
        if self.image_grid is not None or self.anyres_map is not None:
            return f"{self.name} is sized for an image here, which has no frames"
        return None

    def llm_entry_tokens(self, projector_tokens: int) -> int:
        """Visual tokens entering the LLM when the projector sees `projector_tokens` per
        image. Newline tokens belong to the intact anyres layout: once crops are pruned
        the compiled model concatenates the kept tokens of every crop without them."""
        if projector_tokens == self.projector_tokens:
            return self.image_tokens
        return projector_tokens

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # ------------------------------------------------------------------ torch side
    def config(self) -> Any:
        """A fresh transformers config for this model (callers may mutate it)."""
        if self.make_config is None:
            raise ValueError(f"model spec '{self.name}' has no config factory")
        return self.make_config()

    def build(
        self,
        device: "str | torch.device" = "meta",
        dtype: "str | torch.dtype | None" = None,
        seed: int = 0,
        attn_implementation: str | None = None,
    ):
        """Instantiate the transformers model (random weights, eval mode; the trained
        weights of `source` for a `pretrained` spec, where `seed` plays no part).

        `device="meta"` allocates nothing and skips weight init (llava-1.5-7b builds in
        well under a second); on a real device the weights are drawn from the model's own
        initialiser under `torch.manual_seed(seed)` without touching the global RNG, so the
        same seed gives the same weights. `dtype` defaults to the spec's dtype.
        """
        from .loading import build_model, load_weights

        if self.pretrained and str(device) != "meta":
            return load_weights(self, self.source, device=device, dtype=dtype, attn_implementation=attn_implementation)
        return build_model(self, device=device, dtype=dtype, seed=seed, attn_implementation=attn_implementation)

    def param_count(self) -> int:
        """Parameters of the built model (counted on the meta device, cached)."""
        from .loading import param_count

        return param_count(self)

    def summary(self) -> dict:
        """One registry row: what `vtdsl models` prints."""
        return {
            "name": self.name,
            "family": self.family,
            "visual_tokens": self.image_tokens,
            "vit_layers": self.vit.layers,
            "llm_layers": self.llm.layers,
            "params": self.param_count(),
            "dtype": self.dtype,
            "description": self.description,
        }
