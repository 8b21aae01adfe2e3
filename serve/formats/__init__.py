"""Checkpoint sources the loader reads beyond a bare state_dict: one module per concern.

safe_globals.py    what torch's weights_only unpickler may build besides tensors (never code)
training.py        weights inside training checkpoints: EMA entries, key prefixes, Lightning
timm_folder.py     a timm / Hugging Face model folder: config.json + weights file
entry.py           a models.yaml entry inferred from a checkpoint (inspect --config)
state_dict.py      state_dict files: read without running code, weights found, module built, weights loaded
opened.py          what the self-contained formats' readers share: format names, Opened, Implied
packaged.py        files that package their own model: which one a file is (by content), what it implies
torchscript.py     torch.jit.save files (scripted or traced), read with torch.jit.load
exported.py        torch.export programs (.pt2), read with torch.export.load only with trust_code
mar.py             TorchServe archives: built-in image handlers only, a modelFile only with trust_code
"""
