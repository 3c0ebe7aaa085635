"""The built-in node pack: utility nodes, and the diffusion nodes on diffusers + PEFT."""

import os

# Progress and warnings reach users as our events; the libraries' own bars and notices (model
# shards written, an optional torchvision missing) are noise on a terminal. Users can still set these.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from nodes import conditioning, controlnet, diffusion, hotswap, ksampler, latent, loaders, output, utility  # noqa: E402

NODES = [*utility.NODES, *diffusion.NODES, *hotswap.NODES, *loaders.NODES, *conditioning.NODES, *latent.NODES,
         *controlnet.NODES, *ksampler.NODES, *output.NODES]
