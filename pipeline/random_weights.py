"""The real-size Wan2.1 I2V 14B pipeline with random weights, built in code: no download, about a second on a GPU.

Why: speed and memory do not depend on the values, so anyone with a GPU can measure them (and an operator can
size a GPU) before 80 GB of weights are on disk. Its videos are noise. Every component is built at its real
config directly on the target device in its serving dtype (bf16 transformer and text encoder on CUDA, float32
CLIP and VAE, as `pipeline.loader` loads the real weights), or on the `meta` device to count parameters without
allocating them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from pipeline.devices import serving_dtype_for
from pipeline.tiny import byte_tokenizer

NOISE_WARNING = "RANDOM WEIGHTS: every video is noise (for measuring speed and memory only)"
MAX_SEQUENCE_LENGTH = 512

# transformer/config.json of Wan-AI/Wan2.1-I2V-14B-480P-Diffusers (the 720P checkpoint has the same one).
WAN_I2V_14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=36,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=1280,
    added_kv_proj_dim=5120,
    rope_max_seq_len=1024,
)
# google/umt5-xxl's encoder, with its real vocabulary (the embedding is 2.1 GB of the 11 GB in bf16).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# The ViT-H/14 image tower of open-clip xlm-roberta-large-vit-huge-14 that Wan2.1 I2V uses.
CLIP_VIT_H_14 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_components(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, object]:
    """Every component of the real pipeline, built directly on `device` (no CPU copy, no second allocation)."""
    device = torch.device(device)
    dtype = dtype or serving_dtype_for(device)
    torch.manual_seed(0)
    with torch.device(device):
        with _default_dtype(dtype):
            transformer = WanTransformer3DModel(**WAN_I2V_14B_TRANSFORMER).eval()
            text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
        with _default_dtype(torch.float32):
            image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H_14)).eval()
            vae = AutoencoderKLWan().eval()  # its defaults are Wan2.1's VAE
    return dict(
        tokenizer=byte_tokenizer(MAX_SEQUENCE_LENGTH),
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}),
        vae=vae,
        transformer=transformer,
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        ),
    )


def build_random_pipeline(device: torch.device | str, dtype: torch.dtype | None = None) -> WanImageToVideoPipeline:
    return WanImageToVideoPipeline(**random_components(device, dtype))


def parameter_counts(pipe_or_components: WanImageToVideoPipeline | dict[str, object]) -> dict[str, int]:
    """Parameters per model component (transformer, text_encoder, image_encoder, vae)."""
    get = pipe_or_components.get if isinstance(pipe_or_components, dict) else pipe_or_components.components.get
    counts = {}
    for name in ("transformer", "text_encoder", "image_encoder", "vae"):
        module = get(name)
        if isinstance(module, torch.nn.Module):
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts


def parameter_bytes(pipe_or_components: WanImageToVideoPipeline | dict[str, object]) -> dict[str, int]:
    """Bytes of each component's parameters and buffers in the dtypes they were built in."""
    get = pipe_or_components.get if isinstance(pipe_or_components, dict) else pipe_or_components.components.get
    sizes = {}
    for name in ("transformer", "text_encoder", "image_encoder", "vae"):
        module = get(name)
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes
