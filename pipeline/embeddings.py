"""Text encodings cached per identical prompt: repeated prompts skip the UMT5-XXL encoder.

Image encodings are not cached: diffusers' WanImageToVideoPipeline.check_inputs refuses `image` together with
`image_embeds`, yet it needs `image` for the VAE latents. CLIP on one 224px image costs milliseconds anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from diffusers import WanImageToVideoPipeline


class _Lru:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_make(self, key: Any, make: Any) -> Any:
        if self.size <= 0:
            return make()
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        value = make()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class EmbeddingCache:
    """Exact: the cached tensors are the ones the pipeline would compute itself."""

    def __init__(
        self, pipe: WanImageToVideoPipeline, size: int = 16, encode_device: torch.device | None = None
    ) -> None:
        self.pipe = pipe
        self.prompts = _Lru(size)
        self.encode_device = encode_device
        """Where the text encoder runs when not on the generating device (e.g. the CPU, to save GPU memory)."""

    @torch.no_grad()
    def prompt_embeds(
        self, prompt: str, negative: str, guidance: bool, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        def make() -> tuple[torch.Tensor, torch.Tensor | None]:
            embeds, negative_embeds = self.pipe.encode_prompt(
                prompt=prompt,
                negative_prompt=negative,
                do_classifier_free_guidance=guidance,
                num_videos_per_prompt=1,
                max_sequence_length=max_sequence_length,
                device=self.encode_device or device,
            )
            if self.encode_device is None:
                return embeds, negative_embeds
            return embeds.to(device), None if negative_embeds is None else negative_embeds.to(device)

        return self.prompts.get_or_make((prompt, negative if guidance else None, max_sequence_length), make)
