"""Graphs: torch.fx capture, ONNX export, TF MetaGraph export and import, and their op tables."""
