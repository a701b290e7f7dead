"""Image data: readers for IDX, image folders and ``.npz`` (``readers``), the standard
Fashion-MNIST split (``fmnist``), data-source names on the command line (``sources``),
splitting a data set into silos (``partition``) and encoding a silo into latents with the
frozen public encoder (``encode``).

Never imports flwr or opacus.
"""
