"""Checkpoint sources the loader reads beyond a bare state_dict: one module per concern.

safe_globals.py    what torch's weights_only unpickler may build besides tensors (never code)
training.py        weights inside training checkpoints: EMA entries, key prefixes, Lightning
timm_folder.py     a timm / Hugging Face model folder: config.json + weights file
entry.py           a models.yaml entry inferred from a checkpoint (inspect --config)
"""
