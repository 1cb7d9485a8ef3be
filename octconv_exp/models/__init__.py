"""The models: octave arithmetic and fused octave layers, the seed CNN, the octave ResNets, octave
BatchNorm, FLOPs and parameter counts, build_model. May import errors only (not data).
"""
