"""Bytes <-> tensors: safetensors I/O, the training-state codec, the TF V2 bundle. No steps, no Lightning."""
