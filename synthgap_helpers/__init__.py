"""synthgap: how far diffusion-generated training images are from real CIFAR-10, and how to close the gap."""

__version__ = "0.1.0"
