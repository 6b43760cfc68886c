"""pai-diffusion-jobs: batch jobs for the PAI-Diffusion Chinese Stable Diffusion models."""

import os

__version__ = "0.1.0"

# transformers warns at import about optional backends (e.g. "no torchvision, using PIL"), diffusers
# about casts it cannot judge: notes for library developers, noise in a job's log. Each library reads
# its variable when it is first imported, after the job's logging is set up; errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
