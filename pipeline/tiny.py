"""A tiny random-weights Wan2.1 image-to-video pipeline, built in code with no download.

It has the real 14B I2V structure (every option the real transformer config sets: image
cross-attention projections, qk norm across heads, cross-attention norm, rope length 1024), only
smaller, so LoRA files, schedulers and the serving path behave as on the real model.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

TEXT_DIM = 16
IMAGE_DIM = 16
HEADS = 2
HEAD_DIM = 12
MAX_SEQUENCE_LENGTH = 64
SEED = 0

# The real transformer/config.json of Wan2.1-I2V-14B-*-Diffusers, for reference:
# added_kv_proj_dim 5120, attention_head_dim 128, cross_attn_norm true, eps 1e-6, ffn_dim 13824,
# freq_dim 256, image_dim 1280, in_channels 36, num_attention_heads 40, num_layers 40,
# out_channels 16, patch_size [1, 2, 2], qk_norm rms_norm_across_heads, rope_max_seq_len 1024, text_dim 4096.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=HEADS,
    attention_head_dim=HEAD_DIM,
    in_channels=36,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=IMAGE_DIM,
    added_kv_proj_dim=HEADS * HEAD_DIM,
    rope_max_seq_len=1024,
)


def byte_tokenizer(model_max_length: int = MAX_SEQUENCE_LENGTH) -> PreTrainedTokenizerFast:
    """Byte-level vocabulary: every prompt tokenizes, and different prompts give different ids."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_tiny_components() -> dict[str, object]:
    torch.manual_seed(SEED)
    tokenizer = byte_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(SEED + 1)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=IMAGE_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=IMAGE_DIM,
        )
    ).eval()
    image_processor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()
    torch.manual_seed(SEED + 3)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        image_processor=image_processor,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def build_tiny_pipeline() -> WanImageToVideoPipeline:
    return WanImageToVideoPipeline(**build_tiny_components())
