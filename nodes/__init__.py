"""The built-in node pack: utility nodes, and the diffusion nodes on diffusers + PEFT."""

import os

# Progress and warnings reach users as our events; the libraries' own bars and notices (model
# shards written, an optional torchvision missing) are noise on a terminal. Users can still set these.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from nodes import (  # noqa: E402
    conditioning,
    controlnet,
    embedding,
    image_batch,
    inpaint,
    ipadapter,
    latent,
    load_image,
    loaders,
    lora,
    lora_tools,
    model_sampling,
    output,
    sampling,
    upscale,
    utility,
)
from nodes.warm import warm_up  # noqa: E402

WARM_UP = warm_up

NODES = [*utility.NODES, *loaders.NODES, *lora.NODES, *lora_tools.NODES, *conditioning.NODES, *embedding.NODES,
         *latent.NODES, *controlnet.NODES, *sampling.NODES, *model_sampling.NODES, *load_image.NODES, *upscale.NODES,
         *inpaint.NODES, *image_batch.NODES, *ipadapter.NODES, *output.NODES]
