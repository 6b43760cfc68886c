"""pai-diffusion-jobs: batch jobs for the PAI-Diffusion Chinese Stable Diffusion models."""

import os

__version__ = "0.1.0"

# transformers warns at import about optional backends (e.g. "no torchvision, using PIL"): notes for
# library developers, noise in a job's log. It reads this before its first log line; errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
