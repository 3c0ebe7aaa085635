"""What `nodegraph serve` loads in the background once it listens, so that the first job does not wait for it.

The server is ready in a fraction of a second because nothing heavy is imported at start; without this, the
first prompt pays for importing torch, diffusers, transformers and peft (seconds on a small CPU). The built-in
pack names `warm_up` as its `WARM_UP` (see nodegraph/registry.py); the server runs it on its worker thread
before the first job, so a job that arrives meanwhile waits for it rather than importing the same modules at
the same time. No model is loaded: which one a job wants is not known yet.
"""

from __future__ import annotations


def warm_up() -> None:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import nodes.engine.pipelines  # noqa: F401
    import nodes.engine.reconcile  # noqa: F401  (peft)
    import nodes.engine.samplers  # noqa: F401
    import nodes.engine.single_file  # noqa: F401

    # The first call of an operator sets up its kernels: do it on tiny tensors rather than in the first step.
    x = torch.zeros(1, 4, 8, 8)
    torch.nn.functional.conv2d(x, torch.zeros(4, 4, 3, 3), padding=1)
    torch.nn.functional.scaled_dot_product_attention(*(torch.zeros(1, 1, 4, 8),) * 3)
    torch.nn.functional.group_norm(x, 2)
