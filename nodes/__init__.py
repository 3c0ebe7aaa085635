"""The built-in node pack: utility nodes, and the diffusion nodes on diffusers + PEFT."""

from nodes import utility

NODES = [*utility.NODES]
