"""Models: the build cache and GGUF conversion (``cache``), the tiny offline model (``tiny``), and loading with
dtype, 4-bit quantization and LoRA configs (``load``)."""
