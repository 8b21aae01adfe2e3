"""Runtimes: what runs a model's forward (eager PyTorch, ONNX Runtime)."""
