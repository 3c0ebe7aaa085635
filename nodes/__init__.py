"""The built-in node pack: utility nodes, and the diffusion nodes on diffusers + PEFT."""

from nodes import diffusion, output, utility

NODES = [*utility.NODES, *diffusion.NODES, *output.NODES]
