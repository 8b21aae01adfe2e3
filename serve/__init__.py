"""A PyTorch image-classification server: checkpoint + config in, HTTP predictions out."""
