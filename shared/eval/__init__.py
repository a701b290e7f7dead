"""Utility of synthetic data the way the field measures it: a downstream CNN trained on
synthetic images and tested on real ones (``cnn``, ``evaluate``), Fréchet distances and
k-NN precision/recall (``fid``).

May import torch; never flwr or opacus.
"""
