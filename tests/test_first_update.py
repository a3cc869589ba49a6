"""``compare --first-update``: each adapter init's first PPO update from one shared rollout
(:mod:`eva_rl.experiments.studies.first_update`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from eva_rl.experiments.environments import import_packages
from eva_rl.experiments.studies.first_update import (
    FACTORS,
    _adapted,
    _finish_eva,
    _first_update,
    _kl,
    _matched_cell,
    _Rollouts,
    layer_inputs,
    matched_factor,
    record_path,
    suite_first_update,
)
from eva_rl.loading import load_pretrained
from tests.test_cli import run_cli
from tests.test_compare import smoke_suite


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_matched_factor_inverts_a_power_law_between_the_factors(power: float) -> None:
    kl = {str(f): 0.5 * f**power for f in FACTORS}
    target = 0.5 * 0.1**power  # between 1/16 and 1/4
    assert matched_factor(kl, target) == pytest.approx(0.1)
    assert matched_factor(kl, kl["1.0"]) == pytest.approx(1.0)
    assert matched_factor(kl, 2.0) is None and matched_factor(kl, 1e-9) is None and matched_factor(kl, 0.0) is None


def test_matched_factor_takes_the_largest_fraction_on_a_curve_that_turns() -> None:
    kl = {"1.0": 4.0, "0.25": 1.0, "0.0625": 4.0, "0.015625": 1.0}
    assert matched_factor(kl, 2.0) == pytest.approx(0.25 ** (1 / 2))
    # where no fraction brackets the reference's KL, the page says on which side it lies
    assert _matched_cell({"matched": 0.3, "kl_over_reference": 40.0}) == "1 / 3.33"
    assert _matched_cell({"matched": None, "kl_over_reference": 0.9}) == ">= 1"
    assert _matched_cell({"matched": None, "kl_over_reference": 1e4}) == "< 1 / 64"


@pytest.fixture(scope="module")
def smoke_model():
    suite = dataclasses.replace(smoke_suite(), methods=["lora"], seeds=1)
    spec = suite.run_spec(suite.tasks[0], "lora", 0, Path("unused"))
    import_packages(spec.task.env_packages)
    agent = load_pretrained(spec.agent_path, device="cpu")
    with closing(_Rollouts(spec, agent, 0)) as rollouts, closing(_Rollouts(spec, agent, 0)) as again:
        yield _adapted(spec, agent), rollouts[0], again[0]


def test_kl_is_the_closed_form_kl_from_the_policy_before_a_change(smoke_model) -> None:
    model, rollout, _ = smoke_model
    policy = model.policy
    observations = torch.as_tensor(rollout.observations).reshape(-1, *rollout.obs_shape)
    bias = policy.action_net.base_layer.bias
    with torch.no_grad():
        before = copy.copy(policy.get_distribution(observations))
        log_p0 = before.distribution.logits.double().log_softmax(-1)  # PointGoal's actions are discrete
        bias.add_(torch.linspace(-0.5, 0.5, bias.numel()))
        log_p1 = policy.get_distribution(observations).distribution.logits.double().log_softmax(-1)
        closed = (log_p0.exp() * (log_p0 - log_p1)).sum(-1).mean()
        assert float(closed) > 1e-3
        assert _kl(policy, before, observations) == pytest.approx(float(closed), rel=1e-5)
        bias.sub_(torch.linspace(-0.5, 0.5, bias.numel()))
    assert _kl(policy, before, observations) == pytest.approx(0.0, abs=1e-7)


def test_a_first_update_leaves_the_model_at_its_init_and_repeats_exactly(smoke_model) -> None:
    model, rollout, again = smoke_model
    torch.testing.assert_close(torch.as_tensor(rollout.observations), torch.as_tensor(again.observations))
    params = [p.detach().clone() for p in model.policy.parameters()]
    inputs = layer_inputs(model, rollout)
    first = _first_update(model, rollout, 1e-2, seed=0, inputs=inputs)
    for param, saved in zip(model.policy.parameters(), params, strict=True):
        torch.testing.assert_close(param.detach(), saved)
    assert not model.policy.optimizer.state  # Adam starts afresh for the next rate
    assert _first_update(model, rollout, 1e-2, seed=0, inputs=inputs) == first
    assert first["kl"] > 0 and first["approx_kl"] > 0
    policy_layers = {n: f for n, f in first["layers"].items() if "value" not in n}
    value_layers = {n: f for n, f in first["layers"].items() if "value" in n}
    assert all(f["kl_alone"] > 0 for f in policy_layers.values()) and value_layers
    assert all(f["kl_alone"] == 0 for f in value_layers.values())  # the critic moves no action distribution
    assert all(0 < f["straightness"] <= 1 for f in first["layers"].values() if "straightness" in f)
    # far below the rate (in between, PPO clips: not monotone)
    smaller = _first_update(model, rollout, 1e-5, seed=0, inputs=inputs)
    assert smaller["kl"] < first["kl"]


def test_a_signals_against_the_layers_own_inputs_and_the_trained_a(smoke_model) -> None:
    model, rollout, _ = smoke_model
    policy = model.policy
    observations = torch.as_tensor(rollout.observations).reshape(-1, *rollout.obs_shape)
    layers = {name: layer for name, layer in policy.lora_layers.items() if layer.r}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda _, args, name=name: inputs[name].append(args[0].detach().double()))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        policy.get_distribution(observations), policy.predict_values(observations)
    for hook in hooks:
        hook.remove()
    start = {name: layer.lora_A.detach().double().clone() for name, layer in layers.items()}
    params = [p.detach().clone() for p in policy.parameters()]
    figures = _first_update(model, rollout, 1e-2, seed=0, inputs=layer_inputs(model, rollout))
    # the same update again, kept this time: the study's is restored after it (and repeats exactly)
    model.rollout_buffer, model.lr_schedule = copy.deepcopy(rollout), lambda _: 1e-2
    np.random.seed(0)
    model.train()
    for name, layer in layers.items():
        x = inputs[name][0]  # PointGoal's layers are Linear: the rows are the inputs
        kaiming = x.square().sum(1).mean() / (3 * x.shape[1])
        signal = ((x @ start[name].T).square().mean() / kaiming).sqrt()
        moved = x @ (layer.lora_A.detach().double() - start[name]).T
        update = (moved.square().mean() / (x @ start[name].T).square().mean()).sqrt()
        assert figures["layers"][name]["a_signal"] == pytest.approx(float(signal), rel=1e-9)
        assert figures["layers"][name]["a_update_signal"] == pytest.approx(float(update), rel=1e-6)
    assert all(figures["layers"][name]["a_update_signal"] > 0 for name in layers)
    with torch.no_grad():  # the module's model back at its init for the tests after this one
        for param, saved in zip(policy.parameters(), params, strict=True):
            param.copy_(saved)
    policy.optimizer.state.clear()


def test_compare_first_update_measures_each_seed_once_and_redraws_the_page(tmp_path: Path) -> None:
    suite = dataclasses.replace(smoke_suite(), methods=["lora", "eva", "dora", "full"], seeds=1)
    lines: list[str] = []
    report = suite_first_update(suite, tmp_path, echo=lines.append)["PointGoal"]
    assert set(report) == {"lora", "eva"}  # DoRA's update is not s * B A; full fine-tuning has no adapter
    assert lines[0] == "PointGoal seed 0: the first update of lora, eva"
    record = json.loads(record_path(tmp_path / "smoke", "PointGoal", "eva", 0).read_text())
    assert list(record["factors"]) == [str(f) for f in FACTORS] and record["learning_rate"] == pytest.approx(1e-2)
    assert record["platform"]["threads"] == torch.get_num_threads() and record["platform"]["device"] == "cpu"
    assert report["lora"]["matched"] == pytest.approx(1.0)  # the reference matches itself at its own rate
    page = (tmp_path / "smoke" / "first_update.md").read_text()
    assert "## PointGoal" in page and "| eva | 1 | 0.01 |" in page and "KL at rate / 64" in page
    assert f"Platform: {record['platform']['cpu']}; torch {torch.__version__}" in page
    assert (tmp_path / "smoke" / "first_update.png").stat().st_size > 10_000
    lines.clear()
    assert suite_first_update(suite, tmp_path, echo=lines.append) == suite_first_update(
        suite, tmp_path, report_only=True, echo=lines.append
    )
    assert lines == []  # nothing measured twice
    assert (tmp_path / "smoke" / "first_update.md").read_text() == page
    # a command naming the methods in another order redraws the same page: the suite's order
    suite_first_update(suite, tmp_path, methods=["eva", "lora"], report_only=True)
    assert (tmp_path / "smoke" / "first_update.md").read_text() == page
    assert math.isfinite(
        json.loads((tmp_path / "smoke" / "first_update.json").read_text())["tasks"]["PointGoal"]["eva"]["kl"]["1.0"][0]
    )


def test_first_update_refuses_other_studies_flags_and_a_suite_not_measured(tmp_path: Path) -> None:
    done = run_cli("compare.py", "--suite", "smoke", "--first-update", "--anatomy")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: --anatomy and --first-update are two studies: pass one" in done.stderr
    done = run_cli("compare.py", "--suite", "smoke", "--first-update", "--tune")
    assert done.returncode == 2 and "drop --tune, --rank-study and --backend" in done.stderr
    done = run_cli("compare.py", "--suite", "smoke", "--first-update", "--report-only", "--log-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    want = f"error: no first update of suite smoke is measured under {tmp_path / 'smoke' / 'first-update'}"
    assert want in done.stderr


def test_eva_reads_the_rollouts_from_the_first_until_it_converges_as_in_a_run() -> None:
    suite = dataclasses.replace(smoke_suite(), methods=["eva"], seeds=1)
    spec = suite.run_spec(suite.tasks[0], "eva", 0, Path("unused"))
    import_packages(spec.task.env_packages)
    agent = load_pretrained(spec.agent_path, device="cpu")
    with closing(_Rollouts(spec, agent, 0)) as rollouts:
        model = _adapted(spec, agent)
        assert model.eva_pending  # the run's EVA: on PPO's rollouts
        read = _finish_eva(model, rollouts, spec.task.total_timesteps)
        assert not model.eva_pending and read == len(rollouts.kept) >= 1
        # oracle: the first layer's inputs are the observations; its A's top row is their top principal direction
        observations = torch.cat(
            [torch.as_tensor(r.observations).reshape(-1, *r.obs_shape).flatten(1) for r in rollouts.kept]
        ).double()
        top = torch.linalg.svd(observations - observations.mean(0), full_matrices=False).Vh[0]
        lora_a = model.policy.lora_layers["mlp_extractor.policy_net.0"].lora_A.detach().double()
        assert abs(float(lora_a[0] @ top)) / float(lora_a[0].norm()) > 0.95


def test_the_page_keeps_three_significant_digits_of_a_small_kl() -> None:
    """A 1M agent's first update at its small rate moves the policy by a KL of 1e-4: the page must not round it
    to 0.000."""
    from eva_rl.experiments.studies.first_update import FACTORS, _summary, first_update_markdown

    def record(seed: int, kl: float) -> dict:
        factors = {str(f): {"kl": kl * f, "approx_kl": kl * f, "layers": {}} for f in FACTORS}
        return {"seed": seed, "learning_rate": 3.125e-5, "factors": factors}

    summary = _summary([record(0, 1.2e-4), record(1, 1.2e-4)])
    page = first_update_markdown("smoke", {"Task": {"lora": summary}})
    assert "| lora | 2 | 3.13e-05 | 0.00012 [0.00012, 0.00012] | 3e-05 [3e-05, 3e-05] |" in page


def test_the_plot_has_one_legend_naming_each_method_once_with_its_seeds() -> None:
    import matplotlib.pyplot as plt

    from eva_rl.experiments.studies.first_update import draw_first_update

    def summary(seeds: int) -> dict:
        return {"seeds": list(range(seeds)), "kl": {str(f): [f * 1e-2] * seeds for f in FACTORS}}

    # lora has 3 seeds on both tasks, eva 3 on one and 2 on the other
    report = {"a": {"lora": summary(3), "eva": summary(3)}, "b": {"lora": summary(3), "eva": summary(2)}}
    figure = draw_first_update(report)
    legends = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    assert len(legends) == 1
    assert [text.get_text() for text in legends[0].get_texts()] == ["lora (3 seeds)", "eva (2-3 seeds)"]
    plt.close(figure)
