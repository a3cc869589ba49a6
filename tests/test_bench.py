"""bench.py as a smoke test: it runs and reports every figure (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from eva_rl.experiments.cli import bench_main


@pytest.mark.filterwarnings("ignore:EVA:UserWarning")
def test_bench_quick_prints_every_figure(capsys: pytest.CaptureFixture) -> None:
    assert bench_main(["--quick"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "eva_batches",
        "eva_env_steps",
        "eva_seconds",
        "ipca_min_cos",
        "eva_env_step_fraction",
        "eva_init_fraction",
        "lora_ppo_throughput_ratio",
        "ranks",
        "lora_ppo_profile_seconds",
        "ppo_source_eva_env_step_fraction",
        "ipca_min_cos_extra16",
    ):
        assert key in figures, key
    assert sum(figures["ranks"].values()) == 4 * len(figures["ranks"])
    assert 0 < figures["ipca_min_cos"] <= 1
    assert figures["eva_env_step_fraction"] == pytest.approx(
        figures["eva_env_steps"] / figures["finetune_timesteps"], rel=1e-3
    )
    offpolicy = figures["offpolicy"]  # LoRA-SAC against plain SAC on the bundled Pendulum agent
    assert offpolicy["algorithm"] == "SAC" and offpolicy["lora_sac_throughput_ratio"] > 0
    assert offpolicy["plain_steps_per_s"] > 0 and offpolicy["lora_steps_per_s"] > 0
    acting = figures["acting"]  # predict calls/s: plain, LoRA keeping its weights, LoRA computing them per call
    assert all(acting[f"{name}_predicts_per_s"] > 0 for name in ("plain", "lora", "lora_uncached"))
    assert acting["lora_acting_ratio"] == pytest.approx(
        acting["lora_predicts_per_s"] / acting["plain_predicts_per_s"], abs=2e-3
    )
    bank = figures["bank"]  # five adapters on one DoorKey agent
    assert bank["tasks"] == 5 and 0 < bank["task_fraction_of_copy"] < 0.2
    assert bank["task_fraction_of_copy"] == pytest.approx(bank["task_bytes"] / bank["full_copy_bytes"])
    assert bank["switch_ms_median"] > 0 and bank["load_zip_ms_median"] > 0
    assert bank["task_file_bytes"] < bank["agent_zip_bytes"] / 5
    view = figures["minigrid_view"]  # MiniGrid's view against ours on DoorKey-8x8
    assert view["minigrid_steps_per_s"] > 0 and view["fast_view_steps_per_s"] > 0
    assert view["speedup"] == pytest.approx(view["fast_view_steps_per_s"] / view["minigrid_steps_per_s"])
    scaling = figures["eva_scaling"]
    assert [(p["width"], p["batch_size"], p["batches"]) for p in scaling] == [(64, 256, 3), (1024, 256, 3)]
    assert all(p["ms_per_batch"] > 0 and p["peak_mib"] >= 0 for p in scaling)
    rollout = figures["n_envs"] * 128  # the DoorKey task's n_steps
    assert figures["ppo_source_deferred_steps"] % rollout == 0
    assert figures["ppo_source_skipped_steps"] == 0 and figures["ppo_source_eva_env_step_fraction"] == 0


def test_bench_weight_cache_only_measures_both_forwards(capsys: pytest.CaptureFixture) -> None:
    from unittest import mock

    from eva_rl.layers import LoraLayer

    cached_calls = []
    original = LoraLayer._cached_weight

    def counting(self: LoraLayer) -> object:
        cached_calls.append(1)
        return original(self)

    with mock.patch.object(LoraLayer, "_cached_weight", counting):
        argv = ["--weight-cache-only", "--env", "PointGoal", "--throughput-steps", "64"]
        assert bench_main(argv) == 0
    cache = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weight_cache"]
    assert cache["task"] == "PointGoal"
    cached, uncached = cache["lora_ppo_throughput_ratio_cached"], cache["lora_ppo_throughput_ratio_uncached"]
    assert len(cached) == len(uncached) == 2 and min(cached + uncached) > 0
    assert cache["cache_gain"] == pytest.approx(sum(cached) / sum(uncached))
    assert cached_calls  # the cached rounds computed through the cache


def test_bench_evaluation_only_scores_both_sides_alike(capsys: pytest.CaptureFixture) -> None:
    from eva_rl.experiments.tasks import find_task

    assert bench_main(["--evaluation-only", "--env", "PointGoal", "--quick"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluation"]
    assert figures["task"] == "PointGoal" and figures["episodes"] == find_task("PointGoal").eval.episodes
    assert figures["same_returns"]  # switching once changes the time, never the episodes
    assert figures["switch_every_predict_episodes_per_s"] > 0 and figures["switch_once_episodes_per_s"] > 0
    assert figures["speedup"] == pytest.approx(
        figures["switch_once_episodes_per_s"] / figures["switch_every_predict_episodes_per_s"], abs=2e-3
    )
    assert figures["predict_us_switch_every"] > 0 and figures["predict_us_switch_once"] > 0
    assert figures["predict_speedup"] == pytest.approx(
        figures["predict_us_switch_every"] / figures["predict_us_switch_once"], rel=2e-3
    )


def test_bench_peft_only_times_both_implementations_at_each_width(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("peft")
    assert bench_main(["--peft-only", "--quick"]) == 0
    points = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eva_vs_peft"]
    assert [p["width"] for p in points] == [256, 1024]
    for point in points:
        assert point["ours_s"] > 0 and point["peft_s"] > 0
        assert point["ratio"] == pytest.approx(point["ours_s"] / point["peft_s"], abs=2e-3)


def test_device_crossover_reports_the_smallest_policy_the_second_device_ran_faster() -> None:
    from eva_rl.experiments.bench import measure_device_crossover

    figures = measure_device_crossover(widths=(16, 32), devices=("cpu", "cpu"), steps=256)
    points = figures["points"]
    assert [p["width"] for p in points] == [16, 32] and points[0]["parameters"] < points[1]["parameters"]
    assert all(p["cpu_steps_per_second"] > 0 for p in points)
    assert figures["crossover_parameters"] is None  # one key per device: the "two" CPUs are the same figure


def test_bench_device_crossover_needs_cuda(capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench_main(["--device-crossover"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_bench_lora_path_only_times_both_paths(capsys: pytest.CaptureFixture) -> None:
    from unittest import mock

    from eva_rl.layers import LoraLayer

    paths = []
    original = LoraLayer.set_path

    def recording(self: LoraLayer, path: str) -> None:
        paths.append(path)
        original(self, path)

    with mock.patch.object(LoraLayer, "set_path", recording):
        argv = ["--lora-path-only", "--quick", "--env", "PointGoal", "--throughput-steps", "64"]
        assert bench_main(argv) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lora_path"]
    assert [(p["width"], p["batch_size"]) for p in figures["layers"]] == [(64, 64), (256, 64)]
    for point in figures["layers"]:
        assert point["merged_over_low_rank"] == pytest.approx(point["merged_us"] / point["low_rank_us"], rel=0.01)
    ppo = figures["ppo"]
    assert ppo["task"] == "PointGoal" and ppo["parameters"] > 0
    auto, merged = ppo["lora_ppo_throughput_ratio_auto"], ppo["lora_ppo_throughput_ratio_merged"]
    assert len(auto) == len(merged) == 2 and min(auto + merged) > 0
    assert ppo["auto_gain"] == pytest.approx(sum(auto) / sum(merged))
    assert {"merged", "low-rank", "auto"} <= set(paths)  # the scan's two paths, then the PPO rounds' two
