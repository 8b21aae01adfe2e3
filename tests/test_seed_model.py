"""The seed article's MyModel: its state_dict and SGD optimizer state_dict print as the article shows."""
from __future__ import annotations

import torch

from models.seed_fcn import MyModel
from serve.cli import main

# Verbatim from the seed article's printed output.
SEED_STATE_DICT_TABLE = """\
fully_conv.0.weight................. torch.Size([96, 3, 11, 11])
fully_conv.0.bias................... torch.Size([96])
fully_conv.1.weight................. torch.Size([96])
fully_conv.1.bias................... torch.Size([96])
fully_conv.1.running_mean........... torch.Size([96])
fully_conv.1.running_var............ torch.Size([96])
fully_conv.1.num_batches_tracked.... torch.Size([])
fully_conv.4.weight................. torch.Size([256, 48, 5, 5])
fully_conv.4.bias................... torch.Size([256])
fully_conv.5.weight................. torch.Size([256])
fully_conv.5.bias................... torch.Size([256])
fully_conv.5.running_mean........... torch.Size([256])
fully_conv.5.running_var............ torch.Size([256])
fully_conv.5.num_batches_tracked.... torch.Size([])
fully_conv.8.weight................. torch.Size([384, 256, 3, 3])
fully_conv.8.bias................... torch.Size([384])
fully_conv.9.weight................. torch.Size([384])
fully_conv.9.bias................... torch.Size([384])
fully_conv.9.running_mean........... torch.Size([384])
fully_conv.9.running_var............ torch.Size([384])
fully_conv.9.num_batches_tracked.... torch.Size([])
fully_conv.11.weight................ torch.Size([384, 192, 3, 3])
fully_conv.11.bias.................. torch.Size([384])
fully_conv.12.weight................ torch.Size([384])
fully_conv.12.bias.................. torch.Size([384])
fully_conv.12.running_mean.......... torch.Size([384])
fully_conv.12.running_var........... torch.Size([384])
fully_conv.12.num_batches_tracked... torch.Size([])
fully_conv.14.weight................ torch.Size([32, 192, 3, 3])
fully_conv.14.bias.................. torch.Size([32])
"""
SEED_OPTIMIZER_TABLE = """\
state.......... {}
param_groups... [{'lr': 0.001, 'momentum': 0.9, 'dampening': 0, 'weight_decay': 0, 'nesterov': False, 'params': [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]}]
"""
SEED_GROUP_KEYS = ["lr", "momentum", "dampening", "weight_decay", "nesterov", "params"]


def test_state_dict_prints_the_seed_table(capsys):
    model = MyModel()
    for param_tensor in model.state_dict():
        print(param_tensor.ljust(36, "."), model.state_dict()[param_tensor].size())
    assert capsys.readouterr().out == SEED_STATE_DICT_TABLE


def test_sgd_state_dict_prints_the_seed_table(capsys):
    model = MyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    state = optimizer.state_dict()
    # Newer torch adds keys (maximize, foreach, ...) to each group; the seed's ones come first, unchanged.
    groups = [{k: g[k] for k in SEED_GROUP_KEYS} for g in state["param_groups"]]
    for var_name, value in (("state", state["state"]), ("param_groups", groups)):
        print(var_name.ljust(15, "."), value)
    assert capsys.readouterr().out == SEED_OPTIMIZER_TABLE


def test_inspect_prints_the_seed_keys_and_shapes(tmp_path, capsys):
    path = tmp_path / "seed.pth"
    torch.save(MyModel().state_dict(), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout:  bare state_dict" in out
    for line in SEED_STATE_DICT_TABLE.splitlines():
        name = line[:36].rstrip(".")
        size = line[36:].strip()
        assert any(l.startswith(name + ".") and size in l for l in out.splitlines()), name
    assert "30 tensors" in out
