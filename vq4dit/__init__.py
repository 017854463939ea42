"""vq4dit-bench: post-training vector quantization of Diffusion Transformers (VQ4DiT), benchmarked."""

__version__ = "0.1.0"
