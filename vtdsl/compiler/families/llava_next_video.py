"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): llava-next-video-7b,
tiny-llava-next-video.

Images as on LLaVA-NeXT (anyres crops, unpadding, newline tokens). Video
(`pixel_values_videos` ``[B, frames, C, H, W]``): each frame one crop at the tower's size,
its patch grid average-pooled before the projector, the frames one after another under
`video_token_id` placeholders. LLM stages run the plan checked for the call's frame count
(`video_spec`); its tokens know their frame.
"""

from __future__ import annotations

from .llava_next import LlavaNext


class LlavaNextVideo(LlavaNext):
    """LLaVA-NeXT's anyres images; videos of pooled frames."""

    name = "llava-next-video"
    video_argument = "pixel_values_videos"


FAMILY = LlavaNextVideo()
