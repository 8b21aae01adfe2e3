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


def seed_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The seed table as data: each key, in order, and its shape."""
    rows = []
    for line in SEED_STATE_DICT_TABLE.splitlines():
        name, size = line[:36].rstrip("."), line[36:].strip()
        rows.append((name, tuple(int(d) for d in size.removeprefix("torch.Size([").removesuffix("])").split(", ") if d)))
    return rows


def test_state_dict_prints_the_seed_table(capsys):
    model = MyModel()
    for param_tensor in model.state_dict():
        print(param_tensor.ljust(36, "."), model.state_dict()[param_tensor].size())
    assert capsys.readouterr().out == SEED_STATE_DICT_TABLE
    # The same as data: the keys in the article's order, each with its shape; 18 of them are parameters.
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == seed_shapes()
    assert len(list(model.parameters())) == 18


def test_a_saved_state_dict_loads_into_a_fresh_model_with_equal_outputs(tmp_path):
    """The article's save/load: torch.save(model.state_dict()), then MyModel().load_state_dict(torch.load())."""
    torch.manual_seed(0)
    model = MyModel()
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))  # batch-norm statistics of its own: buffers, not parameters, must load too
    model.eval()
    path = tmp_path / "seed.pth"
    torch.save(model.state_dict(), path)

    torch.manual_seed(1)
    fresh = MyModel()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(x), model(x))  # other weights: the load below is what makes them equal
        result = fresh.load_state_dict(torch.load(path, weights_only=True))
        assert not result.missing_keys and not result.unexpected_keys
        out = fresh.eval()(x)
        assert out.shape == (2, 32, 1, 1)  # 64x64 in, a 1x1 map of 32 class scores out
        assert torch.equal(out, model(x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_sgd_state_dict_prints_the_seed_table(capsys):
    model = MyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    state = optimizer.state_dict()
    # Newer torch adds keys (maximize, foreach, ...) to each group; the seed's ones come first, unchanged.
    groups = [{k: g[k] for k in SEED_GROUP_KEYS} for g in state["param_groups"]]
    for var_name, value in (("state", state["state"]), ("param_groups", groups)):
        print(var_name.ljust(15, "."), value)
    assert capsys.readouterr().out == SEED_OPTIMIZER_TABLE
    assert state["state"] == {} and groups[0]["params"] == list(range(18))  # one index per parameter, no state yet
    # After a step, the state holds each parameter's momentum buffer, and loads into a new optimizer.
    model(torch.rand(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert sorted(state["state"]) == list(range(18))
    again = torch.optim.SGD(MyModel().parameters(), lr=0.1)
    again.load_state_dict(state)
    assert again.param_groups[0]["lr"] == 0.001 and again.param_groups[0]["momentum"] == 0.9
    for i, p in enumerate(state["state"].values()):
        assert torch.equal(again.state_dict()["state"][i]["momentum_buffer"], p["momentum_buffer"])


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
