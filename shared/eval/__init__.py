"""Utility of synthetic data the way the field measures it: a downstream CNN trained on
synthetic images and tested on real ones (``cnn``, ``evaluate``), Fréchet distances and
k-NN precision/recall (``fid``), the autoencoder ceiling (``autoencoder``: the CNN on the
autoencoder's reconstructions of a real set) and the one schema of a committed results row
(``record``).

May import torch; never flwr or opacus.
"""
