"""Where adapters moved a layer (:mod:`eva_rl.anatomy`): each figure against a direct computation on the stacked
input rows, and ``compare --anatomy`` on the smoke suite's runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from torch import nn

import eva_rl
from eva_rl.anatomy import InputMoments, adapter_update, collect_input_moments, layer_anatomy
from eva_rl.eva import layer_input_rows
from eva_rl.experiments.run_folder import RunFolder
from eva_rl.experiments.studies.anatomy import ANATOMY, UPDATES, _range_cell, first_logged_update, suite_anatomy
from tests.test_cli import run_cli
from tests.test_compare import compare, smoke_suite

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")


def projector(columns: torch.Tensor) -> torch.Tensor:
    return columns @ columns.T


def test_moments_and_principal_directions_match_an_svd_of_the_stacked_rows() -> None:
    torch.manual_seed(0)
    rows = torch.randn(300, 6, dtype=torch.float64) @ torch.diag(torch.tensor([5.0, 3, 2, 1, 0.5, 0.1]).double())
    rows += torch.tensor([1.0, -2, 0, 0, 3, 0]).double()
    moments = InputMoments.empty(6)
    for chunk in rows.split(70):
        moments.update(chunk)
    assert moments.rows == 300
    torch.testing.assert_close(moments.second_moment, rows.T @ rows / 300)
    _, _, vh = torch.linalg.svd(rows - rows.mean(dim=0), full_matrices=False)
    torch.testing.assert_close(projector(moments.principal_directions(3)), projector(vh[:3].T))


def test_change_and_shares_match_their_definitions_on_the_rows() -> None:
    torch.manual_seed(1)
    rows = torch.randn(500, 8, dtype=torch.float64) * torch.linspace(4, 0.2, 8, dtype=torch.float64)
    moments = InputMoments.empty(8)
    moments.update(rows)
    weight, delta, lora_a = torch.randn(5, 8).double(), torch.randn(5, 8).double(), torch.randn(2, 8).double()
    figures = layer_anatomy(weight, delta, lora_a, moments, k=2)
    want = math.sqrt((rows @ delta.T).square().sum(1).mean() / (rows @ weight.T).square().sum(1).mean())
    assert figures["change"] == pytest.approx(want, rel=1e-9)
    top = moments.principal_directions(2)
    inside, outside = torch.randn(5, 2).double() @ top.T, delta - delta @ projector(top)
    assert layer_anatomy(weight, inside, top.T, moments, k=2)["update_top_share"] == pytest.approx(1.0)
    assert layer_anatomy(weight, inside, top.T, moments, k=2)["a_top_share"] == pytest.approx(1.0)
    assert layer_anatomy(weight, outside, outside[:2], moments, k=2)["update_top_share"] == pytest.approx(0, abs=1e-12)
    assert 0 < figures["update_top_share"] < 1 and 0 < figures["a_top_share"] < 1
    kaiming_row = (rows.square().sum(1).mean() / (3 * 8)).sqrt().item()
    assert figures["a_signal"] * kaiming_row == pytest.approx((rows @ lora_a.T).square().mean().sqrt().item(), rel=1e-9)
    # Kaiming-uniform rows (LoRA's A) score 1 on average; the top principal direction more, the last one less
    kaiming = torch.empty(4000, 8)
    nn.init.kaiming_uniform_(kaiming, a=math.sqrt(5))
    assert layer_anatomy(weight, delta, kaiming.double(), moments, k=2)["a_signal"] == pytest.approx(1, rel=0.03)
    unit = torch.eye(8, dtype=torch.float64)
    assert layer_anatomy(weight, delta, unit[:1], moments, k=2)["a_signal"] > 2  # x_0 varies most
    assert layer_anatomy(weight, delta, unit[7:], moments, k=2)["a_signal"] < 1


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_update_is_what_the_adapter_adds_to_the_layers_output(kind: str) -> None:
    torch.manual_seed(2)
    if kind == "linear":
        layer, x = eva_rl.LoraLinear(nn.Linear(6, 4), r=2, alpha=3.0), torch.randn(5, 6)
    else:
        layer, x = eva_rl.LoraConv2d(nn.Conv2d(3, 4, 2, padding=1), r=2, alpha=3.0), torch.randn(2, 3, 5, 5)
    nn.init.normal_(layer.lora_B)
    tensors = {"layer.lora_A": layer.lora_A.detach(), "layer.lora_B": layer.lora_B.detach()}
    delta, lora_a = adapter_update(tensors, "layer", layer.scaling, layer.base_layer.weight.detach())
    assert lora_a.shape == (2, layer.fan_in)
    with torch.no_grad():
        added = layer(x) - layer.base_layer(x)
    # the added output, unit by unit, is dW times the rows the weight sees
    want = added.movedim(1, -1).reshape(-1, 4) if kind == "conv" else added
    torch.testing.assert_close((layer_input_rows(layer, x).double() @ delta.T).float(), want, atol=1e-5, rtol=1e-5)


def test_a_rewritten_base_weight_counts_in_the_update_and_dora_is_refused() -> None:
    weight = torch.randn(4, 6)
    tensors = {"l.lora_A": torch.zeros(2, 6), "l.lora_B": torch.zeros(4, 2), "l.base_layer.weight": weight + 1}
    delta, _ = adapter_update(tensors, "l", 1.0, weight)
    torch.testing.assert_close(delta, torch.ones(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="DoRA"):
        adapter_update({**tensors, "l.lora_magnitude": torch.ones(4)}, "l", 1.0, weight)


def test_collected_moments_are_those_of_the_rows_each_layer_saw() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    batches = [torch.randn(4, 2, 4, 4) for _ in range(3)]
    moments = collect_input_moments(net, {"0": net[0], "3": net[3]}, batches, lambda module, batch: module(batch))
    patches = torch.cat([layer_input_rows(net[0], b) for b in batches]).double()
    flat = torch.cat([net[2](net[1](net[0](b))) for b in batches]).detach().double()
    assert moments["0"].rows == patches.shape[0] and moments["3"].rows == 12
    torch.testing.assert_close(moments["0"].second_moment, patches.T @ patches / patches.shape[0])
    torch.testing.assert_close(moments["3"].second_moment, flat.T @ flat / 12)
    assert not net[0]._forward_pre_hooks


def test_compare_anatomy_measures_each_adapter_run_and_redraws_from_its_files(tmp_path: Path) -> None:
    suite = dataclasses.replace(smoke_suite(), methods=["eva", "lora-fa", "full", "dora"], seeds=1)
    compare(suite, tmp_path, echo=lambda line: None)
    lines: list[str] = []
    report = suite_anatomy(suite, tmp_path, echo=lines.append)["PointGoal"]
    assert lines == [
        "PointGoal: the pretrained agent's activations (4096 env steps)",
        "PointGoal eva: 1 runs measured, 0 read back",
        "PointGoal lora-fa: 1 runs measured, 0 read back",
    ]
    assert set(report) == {"eva", "lora-fa"}  # full fine-tuning has no adapter, DoRA's update is not s * B A
    run = json.loads((tmp_path / "smoke" / "PointGoal" / "eva" / "seed0" / ANATOMY).read_text())
    k = suite.task(suite.tasks[0]).lora.r
    for layer, figures in run["layers"].items():
        chance = min(k, figures["fan_in"]) / figures["fan_in"]
        assert figures["change"] > 0, layer
        # EVA's A rows start as the top principal directions of these inputs (its own rollouts: nearly the same)
        assert figures["a_top_share"] > max(0.5, chance), layer
    shares = {m: [f["a_top_share"] for f in report[m]["layers"].values()] for m in report}
    assert sum(shares["eva"]) > sum(shares["lora-fa"])  # a random A's rows mostly miss the top directions
    page = (tmp_path / "smoke" / "anatomy.md").read_text()
    assert "## PointGoal" in page and "| eva | 1 |" in page and "| lora-fa | 1 |" in page
    (tmp_path / "smoke" / "PointGoal" / "eva" / "seed0" / "adapter" / "adapter.safetensors").unlink()
    again = suite_anatomy(suite, tmp_path, report_only=True, echo=lines.append)["PointGoal"]
    assert again == report and lines[-1] == "PointGoal lora-fa: 0 runs measured, 1 read back"  # nothing measured
    assert (tmp_path / "smoke" / "anatomy.md").read_text() == page
    # each run's first PPO updates, as its TensorBoard log has them
    logged = logged_scalars(tmp_path / "smoke" / "PointGoal" / "eva" / "seed0", "train/approx_kl")
    assert 1 <= len(run["approx_kl"]) <= UPDATES and run["approx_kl"] == pytest.approx(logged[:UPDATES])
    assert report["eva"]["approx_kl"]["first"] == pytest.approx(logged[:1])
    # which update the first logged KL is, against the step the log holds it at (one rollout per update)
    for method in ("eva", "lora-fa"):
        folder = RunFolder(tmp_path / "smoke" / "PointGoal" / method / "seed0")
        settings = folder.read_result().settings
        rollout = settings["hyperparameters"].get("n_steps", 2048) * settings["n_envs"]
        assert logged_steps(folder.path, "train/approx_kl")[0] == first_logged_update(folder) * rollout, method
        assert report[method]["first_logged_update"] == [first_logged_update(folder)]
    assert report["lora-fa"]["first_logged_update"] == [1] and report["eva"]["first_logged_update"][0] > 1
    # a run measured before the KL was kept gets it from its log, and one whose log is gone has none on the page
    lora_fa = tmp_path / "smoke" / "PointGoal" / "lora-fa" / "seed0"
    record = json.loads((lora_fa / ANATOMY).read_text())
    kl = record.pop("approx_kl")
    (lora_fa / ANATOMY).write_text(json.dumps(record))
    suite_anatomy(suite, tmp_path, report_only=True, echo=lines.append)
    assert json.loads((lora_fa / ANATOMY).read_text())["approx_kl"] == kl
    assert (tmp_path / "smoke" / "anatomy.md").read_text() == page
    (lora_fa / ANATOMY).write_text(json.dumps(record))
    for events in lora_fa.glob("events.out.tfevents.*"):
        events.unlink()
    suite_anatomy(suite, tmp_path, report_only=True, echo=lines.append)
    assert "approx_kl" not in json.loads((lora_fa / ANATOMY).read_text())
    page = (tmp_path / "smoke" / "anatomy.md").read_text()
    assert next(line for line in page.splitlines() if "| lora-fa | 1 |" in line).endswith("| - | - |")
    # runs measured before a figure was kept: left out of it, and a figure no run has is not on the page
    for method in ("eva", "lora-fa"):
        folder = tmp_path / "smoke" / "PointGoal" / method / "seed0"
        record = json.loads((folder / ANATOMY).read_text())
        for figures in record["layers"].values():
            del figures["a_signal"]
        (folder / ANATOMY).write_text(json.dumps(record))
        suite_anatomy(suite, tmp_path, report_only=True, echo=lines.append)
        page = (tmp_path / "smoke" / "anatomy.md").read_text()
        assert ("a_signal" in page) == (method == "eva")
    assert "| eva | 1 |" in page and "**change**" in page


def logged_events(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of each record of ``tag`` in the run's TensorBoard event files, read event by event."""
    records = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            records += [(event.step, value.simple_value) for value in event.summary.value if value.tag == tag]
    return records


def logged_scalars(run_dir: Path, tag: str) -> list[float]:
    """The values of ``tag`` in the run's TensorBoard event files."""
    return [value for _, value in logged_events(run_dir, tag)]


def logged_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps ``tag`` is logged at in the run's TensorBoard event files."""
    return [step for step, _ in logged_events(run_dir, tag)]


@pytest.mark.parametrize(
    ("values", "cell"),
    [
        ([1, 1], "1"),
        ([1, 7, 3], "1-7"),
        ([7, None], "7 (1 of 2 runs)"),
        ([3, None, 9], "3-9 (2 of 3 runs)"),
        ([None], "-"),
    ],
)
def test_the_which_update_cell_gives_the_range_and_how_many_runs_it_covers(values: list, cell: str) -> None:
    assert _range_cell(values) == cell


def test_anatomy_refuses_the_flags_of_other_studies_and_a_suite_without_runs(tmp_path: Path) -> None:
    done = run_cli("compare.py", "--suite", "smoke", "--anatomy", "--tune")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--anatomy reads a suite's completed runs: drop --tune" in done.stderr
    done = run_cli("compare.py", "--suite", "smoke", "--anatomy", "--log-dir", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    want = f"error: no completed adapter run of suite smoke under {tmp_path / 'smoke'}: run the suite first"
    assert want in done.stderr
