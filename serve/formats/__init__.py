"""Checkpoint sources the loader reads beyond a bare state_dict: one module per concern.

packaged.py        files that package their own model: which one a file is (by content), what it implies
torchscript.py     torch.jit.save files (scripted or traced), read with torch.jit.load
exported.py        torch.export programs (.pt2), read with torch.export.load only with trust_code
mar.py             TorchServe archives: built-in image handlers only, a modelFile only with trust_code
"""
