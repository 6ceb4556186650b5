"""LoRA stacks: reading a LoRA's keys in every published layout, planning them onto the model, and switching
strengths (fused, unfused adapters, full-weight differences).

Knows the loaded model's modules and quantized layers (pipeline.weight_files); must not know the generator, speed
options or where LoRA files come from (weights/)."""
