"""Single weight files: a transformer or text encoder read from one .safetensors/.gguf file instead of the preset's
diffusers directory (header and format, shape checks, fp8/GGUF layers, what each format costs in memory).

Knows the model's shapes and the files' layouts; must not know LoRAs, speed options, the generator or where files are
fetched from (weights/)."""
