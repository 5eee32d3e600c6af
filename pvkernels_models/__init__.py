"""Pseudo-video model wrappers on the pvkernels ops: VQVAE and its video counterpart CViViT,
DDPM and its video counterpart VideoDiffusion; data, metrics (PSNR, FID), the tokenizers'
optional GAN and perceptual losses, the training CLI and the demo."""
from .diffusion import DDPM, VideoDiffusion
from .tokenizers import CViViT, VQVAE

__all__ = ["CViViT", "DDPM", "VQVAE", "VideoDiffusion"]
