"""octconv-exp: a Hydra-configured experiment framework for Octave Convolution."""
__version__ = "0.1.0"
