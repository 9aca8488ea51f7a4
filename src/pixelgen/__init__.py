"""pixelgen: pixel-space diffusion with perceptual losses (PixelGen, arXiv 2602.02493).

Importing the package does no work; every module builds what it needs when called.
"""

__version__ = "0.1.0"
