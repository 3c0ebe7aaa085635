"""The built-in node pack: utility nodes, and the diffusion nodes on diffusers + PEFT."""

import os

# Progress and warnings reach users as our events; the libraries' own bars and notices (model
# shards written, an optional torchvision missing) are noise on a terminal. Users can still set these.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from nodes import (  # noqa: E402
    conditioning,
    diffusion,
    hotswap,
    inpaint,
    ksampler,
    latent,
    load_image,
    loaders,
    output,
    upscale,
    utility,
)

NODES = [*utility.NODES, *diffusion.NODES, *hotswap.NODES, *loaders.NODES, *conditioning.NODES, *latent.NODES,
         *ksampler.NODES, *output.NODES, *load_image.NODES, *upscale.NODES, *inpaint.NODES]
