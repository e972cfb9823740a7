"""Model code the engine runs: the lean Llama family on slotserve.kernels (`llama`), its
CPU fast paths (`cpu_ops`), the transformers fallback for other architectures (`hf`) and
what a model reads from an HF checkpoint (`checkpoint`). Never imports the engine."""
