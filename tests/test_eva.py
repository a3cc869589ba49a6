"""compute_eva on plain nn.Modules, checked against exact SVDs of the stacked layer inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eva_rl import EvaConfig, EvaConvergenceError, LoraConfig, compute_eva
from eva_rl.eva import run_eva
from tests.models import ActorCriticMLP, ConvNet, decaying_stream, image_stream


def exact_pca(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    centred = rows.double() - rows.double().mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    return vt[:k], s[:k].square() / centred.square().sum(), s


def well_separated(s: torch.Tensor, k: int, gap: float = 0.1) -> list[int]:
    """Indices j < k whose singular value is at least ``gap`` (relative) away from both neighbours."""
    keep = []
    for j in range(k):
        left = (s[j - 1] - s[j]) / s[j] if j > 0 else torch.tensor(1.0)
        right = (s[j] - s[j + 1]) / s[j]
        if min(left, right) > gap:
            keep.append(j)
    return keep


def explicit_patches(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Patch rows of a stride-1, unpadded convolution, cut out by slicing (independent of F.unfold)."""
    n, c, h, w = x.shape
    rows = [
        x[:, :, i : i + kh, j : j + kw].reshape(n, c * kh * kw) for i in range(h - kh + 1) for j in range(w - kw + 1)
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("solver", ["lowrank", "full"])
def test_linear_and_conv_directions_match_exact_svd(solver: str) -> None:
    model = ConvNet()
    batches = image_stream(40, 64)
    result = compute_eva(model, batches, r=3, rho=2.0, tau=0.99, svd_solver=solver)
    used = torch.cat(batches[: result.batches_used])
    with torch.no_grad():
        layer_inputs = {
            "conv": explicit_patches(used, 2, 2),
            "fc": torch.tanh(model.conv(used)).flatten(1),
        }
    checked = 0
    for name, rows in layer_inputs.items():
        k = result.max_components[name]
        components, ratios, s = exact_pca(rows, k)
        assert abs(float(result.explained_variance_ratio[name].sum()) - float(ratios.sum())) < 1e-3, name
        rank = result.ranks[name]
        cos = (result.A[name].double() @ components[:rank].T).diagonal().abs()
        for j in well_separated(s, rank):
            assert cos[j] >= 0.999, (name, j, cos)
            checked += 1
    assert checked >= 3
    assert result.A["conv"].shape == (result.ranks["conv"], 8)


def test_budget_conserved_caps_respected_and_rho_one_uniform() -> None:
    model = ActorCriticMLP()
    batches = decaying_stream(60, 64, 10)
    result = compute_eva(model, batches, r=3, rho=2.0)
    assert sum(result.ranks.values()) == 3 * 6
    assert all(rank <= round(3 * 2.0) for rank in result.ranks.values())
    for name, rank in result.ranks.items():
        assert result.A[name].shape == (rank, model.get_submodule(name).in_features)
    assert all(2 <= result.converged_at[name] <= result.batches_used for name in result.ranks)
    assert max(result.converged_at.values()) == result.batches_used
    for name, fed in result.batches_fed.items():  # a layer stops being fed once converged
        assert fed[0] == 1 and fed == sorted(set(fed)) and fed[-1] <= result.batches_used
        assert result.converged_at[name] in fed
    uniform = compute_eva(model, batches, r=3, rho=1.0)
    assert uniform.ranks == dict.fromkeys(uniform.ranks, 3)


class TwoInputs(nn.Module):
    """Two layers reading different halves of the input: one isotropic, one with a fast-decaying spectrum."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Linear(10, 4)
        self.peaked = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flat(x[:, :10]), self.peaked(x[:, 10:])


def test_ranks_move_to_where_the_variance_is() -> None:
    generator = torch.Generator().manual_seed(0)
    decay = 0.2 ** torch.arange(10.0)
    batches = [
        torch.cat([torch.randn(64, 10, generator=generator), torch.randn(64, 10, generator=generator) * decay], 1)
        for _ in range(80)
    ]
    result = compute_eva(TwoInputs(), batches, r=3, rho=2.0, tau=0.9)
    # "peaked" has one dominant direction (ratio ~0.96); "flat" spreads ~0.1 over each of its directions.
    assert result.ranks == {"flat": 5, "peaked": 1}
    assert result.explained_variance_ratio["peaked"][0] > 0.9


def test_layers_with_identical_inputs_share_one_pca() -> None:
    model = ActorCriticMLP()
    result = compute_eva(model, decaying_stream(60, 64, 10), r=3, rho=2.0)
    assert result.shared_inputs == {"value_net.0": "policy_net.0"}
    leader, follower = result.A["policy_net.0"], result.A["value_net.0"]
    assert result.ranks["policy_net.0"] >= result.ranks["value_net.0"]
    assert torch.equal(leader[: follower.shape[0]], follower)


def test_is_bit_for_bit_deterministic() -> None:
    model = ActorCriticMLP()
    batches = decaying_stream(60, 64, 10)
    first = compute_eva(model, batches, r=3, seed=7)
    second = compute_eva(model, batches, r=3, seed=7)
    assert first.ranks == second.ranks
    for name in first.A:
        assert torch.equal(first.A[name], second.A[name])


def test_streams_each_batch_once_from_a_generator() -> None:
    consumed = []

    def generate():
        for i, batch in enumerate(decaying_stream(60, 64, 10)):
            consumed.append(i)
            yield batch

    result = compute_eva(ActorCriticMLP(), generate(), r=2)
    assert consumed == list(range(result.batches_used))


def isotropic(n_batches: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(64, 10, generator=generator) for _ in range(n_batches)]


def test_max_batches_error_names_the_unconverged_layers() -> None:
    with pytest.raises(EvaConvergenceError, match=r"max_batches=3 reached.*policy_net\.0 \(\d/\d components\)"):
        compute_eva(ActorCriticMLP(), isotropic(10), r=2, tau=0.999999, max_batches=3)


def test_max_batches_warn_uses_the_current_estimate() -> None:
    with pytest.warns(UserWarning, match="using the current estimate"):
        result = compute_eva(ActorCriticMLP(), isotropic(10), r=2, tau=0.999999, max_batches=3, on_max_batches="warn")
    assert result.batches_used == 3
    assert not all(result.converged.values())
    assert sum(result.ranks.values()) == 2 * 6


def test_running_out_of_batches_is_an_error() -> None:
    with pytest.raises(EvaConvergenceError, match="ran out after 1"):
        compute_eva(ActorCriticMLP(), isotropic(1), r=2)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.log(self.first(x)))


def test_nan_activations_name_the_layer() -> None:
    with pytest.raises(ValueError, match="non-finite activations .* layer 'second'"):
        compute_eva(Exploding(), [torch.randn(32, 4)] * 5, r=2)


class WithConstantBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.live = nn.Linear(10, 8)
        self.dead = nn.Linear(10, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.live(x), self.dead(torch.ones_like(x) * 0.3)


def test_zero_variance_input_gets_no_rank() -> None:
    result = compute_eva(WithConstantBranch(), decaying_stream(40, 64, 10), r=2, rho=2.0)
    assert result.ranks == {"live": 4, "dead": 0}
    assert result.A["dead"].shape == (0, 10)
    assert float(result.explained_variance_ratio["dead"].abs().sum()) == 0.0


def test_batch_with_fewer_rows_than_components_is_an_error() -> None:
    with pytest.raises(ValueError, match="gives 3 rows at layer 'policy_net.0', fewer than the 8 components"):
        compute_eva(ActorCriticMLP(), [torch.randn(3, 10)] * 4, r=4, rho=2.0)


def test_components_beyond_the_fan_in_are_clipped_with_a_warning() -> None:
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"EVA: round\(r\*rho\) exceeds the fan-in of 0 \(4 -> 3\)"):
        result = compute_eva(model, decaying_stream(40, 64, 3), r=2, rho=2.0)
    assert result.max_components["0"] == 3
    assert result.ranks["0"] <= 3


def test_unknown_target_and_bad_hyperparameters_are_rejected() -> None:
    batches = decaying_stream(4, 64, 10)
    with pytest.raises(ValueError, match="'attention' matches no Linear/Conv2d layer"):
        compute_eva(ActorCriticMLP(), batches, target_modules=["attention"])
    with pytest.raises(ValueError, match=r"EvaConfig.tau=1.5 is invalid: expected a cosine threshold in \[0, 1\]"):
        compute_eva(ActorCriticMLP(), batches, tau=1.5)
    with pytest.raises(ValueError, match=r"LoraConfig.r=0 is invalid"):
        compute_eva(ActorCriticMLP(), batches, r=0)


def test_eva_leaves_module_mode_and_hooks_as_found() -> None:
    model = ActorCriticMLP().train()
    compute_eva(model, decaying_stream(40, 64, 10), r=2)
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_target_subset_and_rank_pattern_zero() -> None:
    result = compute_eva(
        ActorCriticMLP(),
        decaying_stream(40, 64, 10),
        target_modules=["policy_net.0", "policy_net.2", "critic"],
        r=2,
        rank_pattern={"critic": 0},
    )
    assert set(result.ranks) == {"policy_net.0", "policy_net.2", "critic"}
    assert result.ranks["critic"] == 0
    assert sum(result.ranks.values()) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert result.to_dict()["captured_variance"]["critic"] == 0.0


def test_extra_components_bring_eva_to_the_exact_svd_of_the_stream() -> None:
    generator = torch.Generator().manual_seed(0)
    d = 32
    scales = torch.cat([torch.tensor([3.0, 2.6]), torch.linspace(2.0, 0.5, d - 2)])  # a flat tail
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    batches = [(torch.randn(64, d, generator=generator) * scales) @ basis.T for _ in range(12)]
    data = torch.cat(batches).double()
    _, _, vt = torch.linalg.svd(data - data.mean(0), full_matrices=False)

    def worst_cos(extra: int) -> float:
        eva = EvaConfig(rho=1.0, tau=1.0, max_batches=12, on_max_batches="warn", extra_components=extra)
        with pytest.warns(UserWarning, match="max_batches=12 reached"):
            result = run_eva(torch.nn.Linear(d, 4), batches, LoraConfig(r=2), eva)
        assert result.ranks[""] == 2 and result.max_components[""] == 2
        assert result.batches_fed[""] == list(range(1, 13))
        return float(F.cosine_similarity(result.A[""].double(), vt[:2], dim=1).abs().min())

    assert worst_cos(8) > worst_cos(0)
    assert worst_cos(d - 2) > 1 - 1e-6  # every component tracked: the incremental SVD is exact


def turning_span(n_batches: int, rows: int = 128, width: int = 12) -> list[torch.Tensor]:
    """Inputs whose first 4 directions (a random basis) carry equal variance 25 and the rest 0.25: the top-4 span is
    sharp, its components are not (any basis of the span is a principal one)."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    scales = torch.tensor([5.0] * 4 + [0.5] * (width - 4), dtype=torch.float64)
    return [
        ((torch.randn(rows, width, generator=generator, dtype=torch.float64) * scales) @ basis.T).float()
        for _ in range(n_batches)
    ]


def test_the_subspace_cosine_is_the_cosine_of_the_largest_principal_angle() -> None:
    from scipy.linalg import subspace_angles

    from eva_rl.eva import _ComponentTracker

    tracker = _ComponentTracker(6, "full", seed=0, tau=0.99, convergence="subspace")
    batches = turning_span(3)
    tracker.update(batches[0])
    assert tracker.subspace_cosine(4) != tracker.subspace_cosine(4)  # nan: one estimate, nothing to compare yet
    previous = tracker.pca.components_.clone()
    tracker.update(batches[1])
    for rank in (1, 3, 4, 6):
        angles = subspace_angles(previous[:rank].double().T.numpy(), tracker.pca.components_[:rank].double().T.numpy())
        assert tracker.subspace_cosine(rank) == pytest.approx(float(torch.tensor(angles).cos().min()), abs=1e-6)
    assert tracker.subspace_cosine(0) == 1.0


def test_the_subspace_test_stops_once_the_span_settles_and_its_span_is_the_exact_one() -> None:
    model = nn.Linear(12, 3)
    stream = turning_span(60)
    kwargs = {"r": 4, "rho": 1.0, "tau": 0.99, "svd_solver": "full", "max_batches": 60, "on_max_batches": "warn"}
    components = compute_eva(model, stream, **kwargs)
    span = compute_eva(model, stream, convergence="subspace", **kwargs)
    # the four equal-variance components keep turning after their span has settled at the second batch
    assert span.converged == components.converged == {"": True}
    assert span.batches_used == 2 and components.batches_used >= 3 * span.batches_used
    rank = span.ranks[""]
    exact, _, _ = exact_pca(torch.cat(stream[: span.batches_used]), rank)
    cosines = torch.linalg.svdvals(span.A[""].double() @ exact.T)
    assert rank == 4 and float(cosines.min()) >= 0.99  # the same span as an exact SVD of the rows it read


def test_an_unknown_convergence_test_names_the_accepted_ones() -> None:
    with pytest.raises(
        ValueError, match=r"convergence='span' is invalid: expected one of \('components', 'subspace'\)"
    ):
        EvaConfig(convergence="span")


def test_layers_sharing_an_input_wait_for_the_span_at_each_ones_rank() -> None:
    # policy_net.0 and value_net.0 read the same input, whose first 4 directions have equal variance, and EVA gives
    # them ranks 4 and 3: the 3-span (inside the 4) settles after the 4-span; neither layer may be taken before its own
    result = compute_eva(
        ActorCriticMLP(),
        turning_span(80, width=10),
        target_modules=["policy_net.0", "value_net.0", "policy_net.2"],
        r=3,
        rho=2.0,
        svd_solver="full",
        convergence="subspace",
        max_batches=80,
    )
    assert result.ranks["policy_net.0"] == 4 and result.ranks["value_net.0"] == 3
    assert all(result.converged.values())
