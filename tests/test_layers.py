"""LoRA layers and injection: forward, merge/unmerge, patterns, removal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eva_rl
from eva_rl import (
    ConfigError,
    LoraConfig,
    LoraConv2d,
    LoraLinear,
    disable_adapters,
    inject_adapters,
    lora_layers,
    remove_adapters,
)
from eva_rl.inject import find_target_layers, merged_state_dict
from eva_rl.layers import cached_adapter_weights
from eva_rl.plan import AdapterPlan


def make_layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5), torch.randn(7, 6)
    return nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), torch.randn(2, 3, 9, 8)


def randomize(lora: nn.Module) -> None:
    with torch.no_grad():
        lora.lora_A.normal_()
        lora.lora_B.normal_()


def lora_for(kind: str, base: nn.Module, r: int = 3, alpha: float = 6.0, dropout: float = 0.0) -> nn.Module:
    return (LoraLinear if kind == "linear" else LoraConv2d)(base, r, alpha, dropout)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_zero_b_leaves_output_unchanged_and_base_frozen(kind: str) -> None:
    base, x = make_layer(kind)
    expected = base(x)
    lora = lora_for(kind, base)
    assert torch.equal(lora(x), expected)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert lora.lora_A.requires_grad and lora.lora_B.requires_grad
    assert lora.scaling == 2.0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_matches_explicit_low_rank_update(kind: str) -> None:
    base, x = make_layer(kind)
    lora = lora_for(kind, base)
    randomize(lora)
    if kind == "linear":
        expected = base(x) + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    else:
        hidden = F.conv2d(x, lora.lora_A, None, base.stride, base.padding, base.dilation)
        expected = base(x) + 2.0 * torch.einsum("or,brhw->bohw", lora.lora_B[:, :, 0, 0], hidden)
    torch.testing.assert_close(lora(x), expected)


def explicit_output(lora: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + s B A x`` written out by hand (the oracle of every path)."""
    base = lora.base_layer
    if isinstance(lora, LoraLinear):
        return base(x) + lora.scaling * (x @ lora.lora_A.T @ lora.lora_B.T)
    hidden = F.conv2d(x, lora.lora_A, None, base.stride, base.padding, base.dilation)
    return base(x) + lora.scaling * torch.einsum("or,brhw->bohw", lora.lora_B[:, :, 0, 0], hidden)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("path", ["auto", "merged", "low-rank"])
def test_every_path_matches_the_explicit_update_in_output_and_gradients(kind: str, path: str) -> None:
    base, x = make_layer(kind)
    lora = lora_for(kind, base)
    randomize(lora)
    lora.set_path(path)
    x.requires_grad_(True)
    grads = []
    for forward in (lora, lambda inputs: explicit_output(lora, inputs)):
        out = forward(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([out.detach()] + [t.grad.clone() for t in (x, lora.lora_A, lora.lora_B)])
        for t in (x, lora.lora_A, lora.lora_B):
            t.grad = None
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("width", "use_dora", "grad", "low_rank"),
    [(256, False, True, True), (256, False, False, False), (255, False, True, False), (256, True, True, False)],
)
def test_auto_takes_the_low_rank_path_only_for_a_large_layer_that_trains(
    width: int, use_dora: bool, grad: bool, low_rank: bool
) -> None:
    from unittest import mock

    lora = LoraLinear(nn.Linear(256, width), 4, 8.0, use_dora=use_dora)
    randomize(lora)
    x = torch.randn(3, 256)
    with torch.set_grad_enabled(grad), mock.patch.object(LoraLinear, "_adapter", wraps=lora._adapter) as adapter:
        out = lora(x)
    assert adapter.called == low_rank
    if not use_dora:  # DoRA's output is not base + s B A x
        torch.testing.assert_close(out, explicit_output(lora, x), atol=1e-4, rtol=0)
    lora.set_path("merged")
    with torch.set_grad_enabled(grad), mock.patch.object(LoraLinear, "_adapter", wraps=lora._adapter) as adapter:
        lora(torch.randn(3, 256))
    assert not adapter.called


def test_set_path_names_the_paths_and_refuses_low_rank_dora() -> None:
    lora = LoraLinear(nn.Linear(6, 5), 2, 4.0, use_dora=True)
    with pytest.raises(ValueError, match=r"'fast' is unknown: expected one of \['auto', 'merged', 'low-rank'\]"):
        lora.set_path("fast")
    with pytest.raises(ValueError, match="DoRA's weight norm"):
        lora.set_path("low-rank")
    assert lora.path == "auto"


def test_the_path_survives_copies_and_layers_pickled_without_one_take_auto() -> None:
    import copy
    import pickle

    lora = LoraLinear(nn.Linear(6, 5), 2, 4.0)
    lora.set_path("low-rank")
    assert pickle.loads(pickle.dumps(lora)).path == copy.deepcopy(lora).path == "low-rank"
    state = lora.__getstate__()
    del state["path"]
    old = LoraLinear.__new__(LoraLinear)
    old.__setstate__(state)
    assert old.path == "auto"


def fresh_output(lora: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with its weight computed now, bypassing the no-grad cache (the oracle)."""
    with torch.enable_grad():
        return lora._base_forward(x, lora.adapted_weight()).detach()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_no_grad_forward_follows_every_change_of_the_parameters(kind: str, use_dora: bool) -> None:
    base, x = make_layer(kind)
    lora = (LoraLinear if kind == "linear" else LoraConv2d)(base, 3, 6.0, use_dora=use_dora)
    randomize(lora)
    with torch.no_grad(), cached_adapter_weights(lora):
        first = lora(x)
        assert lora._weight_cache is not None and torch.equal(lora(x), first)
    assert torch.equal(first, fresh_output(lora, x))

    def check(change: str) -> None:
        with torch.no_grad(), cached_adapter_weights(lora):
            out = lora(x)
        assert torch.equal(out, fresh_output(lora, x)), f"stale output after {change}"
        assert not torch.equal(out, first), f"{change} changed nothing"

    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    lora(x).square().sum().backward()
    optimizer.step()
    check("an optimizer step")
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    state["lora_B"] += 1.0
    lora.load_state_dict(state)
    check("load_state_dict")
    with cached_adapter_weights(lora):
        first = lora(x).detach()
        lora.lora_A.data = torch.randn_like(lora.lora_A)
        check("replacing a parameter's data")
    with cached_adapter_weights(lora):
        first = lora(x).detach()
        with torch.no_grad():
            base.weight.mul_(2.0)
        check("an in-place change of the base weight")
        if use_dora:
            first = lora(x).detach()
            with torch.no_grad():
                lora.lora_magnitude.mul_(0.5)
            check("a new DoRA magnitude")
    with torch.inference_mode(), cached_adapter_weights(lora):
        assert torch.equal(lora(x), fresh_output(lora, x))
    assert lora._weight_cache is None and not lora._cache_weights  # leaving the block frees the cache


def test_outside_the_cache_block_writes_through_data_are_seen() -> None:
    # SB3's Polyak update writes target networks through .data, which no version counter records
    base, x = make_layer("linear")
    lora = lora_for("linear", base)
    randomize(lora)
    with torch.no_grad():
        before = lora(x)
        lora.lora_B.data.mul_(2.0)
        assert torch.equal(lora(x), fresh_output(lora, x)) and not torch.equal(lora(x), before)
    assert lora._weight_cache is None


def test_cache_blocks_nest_and_the_outer_one_keeps_the_cache() -> None:
    base, x = make_layer("linear")
    model = nn.Sequential(lora_for("linear", base), nn.ReLU())
    lora = model[0]
    randomize(lora)
    with torch.no_grad(), cached_adapter_weights(model):
        model(x)
        with cached_adapter_weights(model):
            model(x)
        assert lora._cache_weights and lora._weight_cache is not None
        cached = lora._weight_cache
        model(x)
        assert lora._weight_cache is cached  # no parameter changed: the same weight is reused
    assert not lora._cache_weights and lora._weight_cache is None


def test_the_no_grad_cache_is_not_pickled_and_copies_do_not_share_it() -> None:
    import copy
    import pickle

    base, x = make_layer("linear")
    lora = lora_for("linear", base)
    randomize(lora)
    with torch.no_grad(), cached_adapter_weights(lora):
        lora(x)
        restored = pickle.loads(pickle.dumps(lora))
        assert restored._weight_cache is None and not restored._cache_weights
        twin = copy.deepcopy(lora)
        assert twin._weight_cache is None and not twin._cache_weights
    with torch.no_grad(), cached_adapter_weights(lora), cached_adapter_weights(twin):
        twin.lora_B.add_(1.0)
        assert torch.equal(twin(x), fresh_output(twin, x))
        assert torch.equal(lora(x), fresh_output(lora, x))
        assert not torch.equal(twin(x), lora(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_merge_and_unmerge_are_exact(kind: str) -> None:
    base, x = make_layer(kind)
    lora = lora_for(kind, base)
    randomize(lora)
    original = base.weight.detach().clone()
    unmerged = lora(x)
    lora.merge()
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), unmerged)


def test_dropout_acts_on_the_adapter_input_only_in_training() -> None:
    base, x = make_layer("linear")
    lora = lora_for("linear", base, dropout=0.5)
    randomize(lora)
    lora.train()
    assert not torch.allclose(lora(x), lora(x))
    lora.eval()
    assert torch.equal(lora(x), lora(x))


def test_conv_rejects_grouped_convolutions() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        LoraConv2d(nn.Conv2d(4, 4, 3, groups=2), 2, 2.0)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2)
        self.body = nn.Sequential(nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.conv(x).flatten(1)))


def test_inject_by_suffix_rank_pattern_and_remove_with_merge() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(3, 2, 4, 4)
    config = LoraConfig(r=2, target_modules=["conv", "body.0", "head"], rank_pattern={"head": 0, "conv": 3})
    wrapped = inject_adapters(model, config)
    assert sorted(wrapped) == ["body.0", "conv"]
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, LoraLinear)
    assert model.conv.r == 3 and model.body[0].r == 2
    for layer in wrapped.values():
        randomize(layer)
    adapted = model(x)
    with disable_adapters(model):
        assert not torch.allclose(model(x), adapted)
    torch.testing.assert_close(model(x), adapted)
    remove_adapters(model, merge=True)
    assert lora_layers(model) == {}
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_merged_state_dict_matches_merging_in_place() -> None:
    torch.manual_seed(0)
    model = Tiny()
    for layer in inject_adapters(model, LoraConfig(r=2)).values():
        randomize(layer)
    state = merged_state_dict(model)
    assert lora_layers(model), "the model itself keeps its adapters"
    remove_adapters(model, merge=True)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value)


def test_remove_without_merge_restores_the_base_model() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(3, 2, 4, 4)
    expected = model(x)
    for layer in inject_adapters(model, LoraConfig(r=2)).values():
        randomize(layer)
    remove_adapters(model)
    torch.testing.assert_close(model(x), expected)


def test_regex_targets_and_exclusion() -> None:
    assert list(find_target_layers(Tiny(), r"body\.\d")) == ["body.0", "body.2"]
    assert list(find_target_layers(Tiny(), None, exclude=["head"])) == ["conv", "body.0", "body.2"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(target_modules=["nope"]), "'nope' matches no Linear/Conv2d layer; available: \\['conv'"),
        (LoraConfig(target_modules="mlp.*"), "'mlp.\\*' matches no Linear/Conv2d layer"),
    ],
)
def test_bad_targets_and_ranks_get_specific_errors(config: LoraConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        inject_adapters(Tiny(), config)


@pytest.mark.parametrize(
    ("config", "capped", "message"),
    [
        (LoraConfig(r=40, target_modules=["body.0"]), {"body.0": 36}, r"width \(fan-in\) for body.0 \(40 -> 36\)$"),
        (
            LoraConfig(r=2, target_modules=["conv"], rank_pattern={"conv": 9}),
            {"conv": 8},
            r"width \(fan-in\) for conv \(9 -> 8\)$",
        ),
    ],
)
def test_a_rank_above_a_layers_width_is_capped_there_with_one_warning(
    config: LoraConfig, capped: dict[str, int], message: str
) -> None:
    with pytest.warns(UserWarning, match="LoRA: rank capped at the layer's " + message) as caught:
        layers = inject_adapters(Tiny(), config)
    assert len(caught) == 1
    assert {name: layer.r for name, layer in layers.items()} == capped
    (name,) = capped
    configured = config.rank_pattern.get(name, config.r)
    assert all(layer.scaling == pytest.approx(config.default_alpha / configured) for layer in layers.values())


def test_injecting_twice_is_refused() -> None:
    model = Tiny()
    inject_adapters(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_adapters(model, LoraConfig(r=2))


def test_linear_subclasses_get_adapters_and_grouped_convolutions_are_refused_up_front() -> None:
    class ScaledLinear(nn.Linear):  # a subclass that is called like any Linear
        pass

    layers = inject_adapters(nn.Sequential(ScaledLinear(4, 4), nn.ReLU()), LoraConfig(r=2))
    assert set(layers) == {"0"}
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(eva_rl.ConfigError, match=r"layer '0' is a Conv2d with groups=2"):
        AdapterPlan.resolve(grouped, LoraConfig(r=2))
    with pytest.raises(eva_rl.ConfigError, match=r"layer '1' is a Conv2d with groups=1, padding_mode='circular'"):
        AdapterPlan.resolve(grouped, LoraConfig(r=2, target_modules=["1"]))


class _Attention(nn.Module):
    """A block with an attention layer: its out_proj is a Linear whose weight MultiheadAttention reads directly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.attention(h, h, h)[0])


def test_a_linear_whose_weight_its_parent_reads_is_left_out_or_refused_by_name() -> None:
    model = _Attention()
    assert list(find_target_layers(model, None)) == ["embed", "head"]
    x = torch.randn(3, 5, 4)
    expected = model(x)
    inject_adapters(model, LoraConfig(r=2))
    torch.testing.assert_close(model(x), expected)  # B = 0: the adapted block computes what it did
    for target in (["out_proj"], "attention.out_proj"):
        with pytest.raises(ConfigError, match=r"names \['attention.out_proj'\]: a MultiheadAttention reads"):
            find_target_layers(_Attention(), target)
