"""nodegraph: a node-graph runtime for diffusion models, built for LoRA work."""

__version__ = "0.1.0"
