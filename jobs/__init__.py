"""pai-diffusion-jobs: batch jobs for the PAI-Diffusion Chinese Stable Diffusion models."""

__version__ = "0.1.0"
