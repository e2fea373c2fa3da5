"""photosim: post-training quantization to 2-16-bit integers and bit-true simulation of photonic engines."""

__version__ = "0.1.0"
