"""Pseudo-video model wrappers (C-ViViT, VQ-VAE, video diffusion, DDPM): coming with the models issue."""
