"""Export of a base LDM plus a finished LoRA adapter to a self-describing ONNX bundle
(``onnx_bundle``), checked against torch (``parity``) before anything is written; the
adapter-swappable base graph and the small edge adapter files (``lora_graph``); the fp16
variant (``fp16``).

May import torch; never flwr or opacus.
"""
