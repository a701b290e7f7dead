"""The on-device sampler: reads an ONNX bundle and generates images with numpy,
onnxruntime and Pillow only (``sampler``), applies edge adapter files to an
adapter-swappable base bundle (``adapter``), its command ``dpfl-sample`` (``cli``) and PNG
grids (``grid``).

Never imports torch (nor anything that does): a device has neither torch nor diffusers.
"""
