"""The data sets (CIFAR-10, synthetic, image folders, your own), normalisation, augmentation on
batches, the in-memory and streaming loaders. May import errors only (not models).
"""
