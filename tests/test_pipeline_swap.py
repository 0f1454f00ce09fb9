"""An exported folder drops into a diffusers Stable Diffusion pipeline as its ``vae`` (all local, no download)."""

import diffusers
import torch

from ldm_vae import AutoencoderKL


def tiny_sd_pipeline(vae: diffusers.AutoencoderKL) -> diffusers.StableDiffusionPipeline:
    """A Stable Diffusion pipeline from random tiny components; prompts are given as embeddings."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def test_exported_vae_runs_in_stable_diffusion_pipeline(tmp_path):
    torch.manual_seed(0)
    ours = AutoencoderKL.from_pretrained("tiny", scaling_factor=0.5)
    ours.save_pretrained(tmp_path / "vae")
    pipe = tiny_sd_pipeline(diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae"))
    embeds = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    common = dict(prompt_embeds=embeds, guidance_scale=1.0, num_inference_steps=2, height=16, width=16)
    latents = pipe(**common, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    image = pipe(**common, output_type="pt", generator=torch.Generator().manual_seed(2)).images
    assert latents.shape == (1, 4, 8, 8) and image.shape == (1, 3, 16, 16)
    # The pipeline's picture is exactly our decode of its latents, through the exported scaling factor.
    ours_image = (ours.decode(ours.unscale_latents(latents)) / 2 + 0.5).clamp(0, 1)
    assert (image - ours_image).abs().max() <= 1e-5
    assert pipe.vae.config.scaling_factor == 0.5
