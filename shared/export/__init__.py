"""Export of a base LDM plus a finished LoRA adapter to a self-describing ONNX bundle
(``onnx_bundle``), checked against torch before anything is written.

May import torch; never flwr or opacus.
"""
