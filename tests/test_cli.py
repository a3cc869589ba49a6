"""scripts/finetune.py and scripts/pretrain.py end to end, on tiny budgets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eva_rl.experiments.cli import COMMANDS, finetune_main, resolve_task
from eva_rl.experiments.finetune import pretrained_return
from eva_rl.experiments.tasks import ROOT, find_task

pytestmark = pytest.mark.filterwarnings("ignore:EVA:UserWarning")

TINY = ["--total-timesteps", "1024", "--eval-freq", "512", "--eval-episodes", "8", "--no-progress"]


def scalar_tags(run_dir: Path) -> set[str]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def first_scalar(run_dir: Path, tag: str) -> tuple[int, float]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    event = accumulator.Scalars(tag)[0]
    return event.step, event.value


@pytest.fixture(scope="module")
def doorkey_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log_dir = tmp_path_factory.mktemp("runs")
    # 2 envs x 768 steps: longer than DoorKey-8x8's 640-step episodes, so every method logs rollout/ tags too.
    # EVA on its own rollouts: the task's default, PPO's, needs two of its 1,024-step rollouts, more than this budget
    argv = ["--env", "MiniGrid-DoorKey", "--methods", "eva,lora,full,scratch", "--log-dir", str(log_dir)]
    argv += [
        "--eva-data",
        "rollouts",
        "--n-envs",
        "2",
        "--total-timesteps",
        "1536",
        "--eval-freq",
        "768",
        "--eval-episodes",
        "8",
        "--no-progress",
    ]
    code = finetune_main(argv)
    assert code == 0
    return log_dir / "MiniGrid-DoorKey"


def test_every_method_writes_the_same_layout_and_tags(doorkey_runs: Path) -> None:
    tags = {}
    for method in ("eva", "lora", "full", "scratch"):
        run_dir = doorkey_runs / method / "seed0"
        assert (run_dir / "model.zip").is_file()
        assert not (run_dir / "checkpoints").exists(), "checkpoints are removed once the run is complete"
        result = json.loads((run_dir / "result.json").read_text())
        assert result["method"] == method and result["total_timesteps"] == 1536
        assert [step for step, _ in result["eval_curve"]] == [0, 768, 1536]
        assert result["trainable_params"] <= result["total_params"]
        assert (run_dir / "eva.json").exists() == (method == "eva")
        assert (run_dir / "adapter" / "adapter.safetensors").exists() == (method in ("eva", "lora"))
        tags[method] = scalar_tags(run_dir)
    common = {tag for tag in tags["full"]}
    assert {"eval/mean_return", "train/trainable_params", "rollout/ep_rew_mean", "train/value_loss"} <= common
    for method, method_tags in tags.items():
        assert method_tags == common, method  # EVA's report is a text table and a chart, no scalar charts
    eva_run = EventAccumulator(str(doorkey_runs / "eva" / "seed0"), size_guidance={"tensors": 0, "images": 0})
    eva_run.Reload()
    groups = {tag.split("/")[0] for tag in common | set(eva_run.Tags()["images"]) | set(eva_run.Tags()["tensors"])}
    assert sorted(groups)[0] == "eval", "TensorBoard (groups sorted by name) opens on the evaluation"
    text_tag = "init/eva_report/text_summary"  # SB3 logs a string as TensorBoard text
    assert text_tag in eva_run.Tags()["tensors"] and "init/eva_allocation" in eva_run.Tags()["images"]
    table = eva_run.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| layer | fan-in | rank | captured variance |") and "env steps" in table
    params = {m: json.loads((doorkey_runs / m / "seed0" / "result.json").read_text())["trainable_params"] for m in tags}
    assert params["eva"] < params["full"] / 5 and params["lora"] < params["full"] / 5
    assert params["full"] == params["scratch"]


def test_adapted_runs_start_at_the_pretrained_return(doorkey_runs: Path) -> None:
    task = find_task("MiniGrid-DoorKey").with_overrides({"eval_episodes": 8})
    expected = pretrained_return(task, task.agent_path, device="cpu")
    for method in ("eva", "lora", "full"):
        step, value = first_scalar(doorkey_runs / method / "seed0", "eval/mean_return")
        assert step == 0
        assert value == pytest.approx(expected, abs=1e-6), method


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["--env", "MiniGrid-DoorKey"], "MiniGrid-DoorKey-8x8-v0"),
        (["--env", "PointGoal"], "PointGoal-Shifted-v0"),
        (["--env", "CartPole-v1"], "CartPole-v1"),
        (["--env", "envs.point_goal:PointGoalEnv"], "envs.point_goal:PointGoalEnv"),
        (["--env", "PointGoal-Shifted-v0", "--gym-package", "envs"], "PointGoal-Shifted-v0"),
    ],
)
def test_env_resolution(argv: list[str], target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    task = resolve_task(COMMANDS["finetune"].parser().parse_args(argv))
    assert task.target_env == target


def run_cli(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_unknown_env_lists_the_known_tasks() -> None:
    done = run_cli("finetune.py", "--env", "MiniGrid-DoorKye")
    assert done.returncode == 2
    assert "unknown env 'MiniGrid-DoorKye'" in done.stderr and "Did you mean: MiniGrid-DoorKey" in done.stderr
    known = done.stderr.split("Known tasks: ")[1].split(".")[0].split(", ")
    assert "MiniGrid-DoorKey" in known and "PointGoal" in known
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def point_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent")
    done = run_cli(
        "pretrain.py",
        "--env",
        "PointGoal-v0",
        "--gym-package",
        "envs",
        "--total-timesteps",
        "2048",
        "--card-episodes",
        "100",
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    card = json.loads((out / "card.json").read_text())
    assert card["source_env"] == "PointGoal-v0" and card["timesteps"] >= 2048 and card["eval_episodes"] == 100
    assert "--gym-package envs" in card["command"] and card["packages"]["stable-baselines3"]
    assert (out / "README.md").read_text().startswith("# PointGoal-v0 source agent")
    return out / "model.zip"


def point_goal_args(agent: Path) -> list[str]:
    """The example env's shifted goal, by id from the package that registers it, with ``agent``."""
    return ["--env", "PointGoal-Shifted-v0", "--gym-package", "envs", "--pretrained", str(agent)]


@pytest.mark.parametrize("eva_data", ["rollouts", "ppo"])
def test_custom_env_fine_tunes_with_eva_through_the_cli(point_agent: Path, tmp_path: Path, eva_data: str) -> None:
    args = [*point_goal_args(point_agent), "--methods", "eva", "--eva-data", eva_data, "--log-dir", str(tmp_path)]
    done = run_cli("finetune.py", *args, *TINY, "--eva-batch-size", "128", "--tau", "0.9")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "PointGoal" / "eva" / "seed0"
    result = json.loads((run_dir / "result.json").read_text())
    report = json.loads((run_dir / "eva.json").read_text())
    assert report["data_source"] == eva_data and result["total_timesteps"] >= 1024
    if eva_data == "ppo":  # EVA read PPO's rollouts: no env steps of its own, and its steps are on PPO's clock
        assert result["eva_env_steps"] == 0 and result["eva_skipped_steps"] == report["skipped_steps"]
    else:
        assert result["eva_env_steps"] == report["env_steps"] > 0
    assert "tensorboard --logdir" in done.stdout and "jumpstart" in done.stdout


def test_resume_after_a_kill_is_the_uninterrupted_run(point_agent: Path, tmp_path: Path) -> None:
    def args(log_dir: Path) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "scripts" / "finetune.py"),
            *point_goal_args(point_agent),
            "--methods",
            "lora",
            "--log-dir",
            str(log_dir),
            "--total-timesteps",
            "16384",
            "--checkpoint-freq",
            "2048",
            "--eval-freq",
            "2048",
            "--eval-episodes",
            "8",
            "--no-progress",
        ]

    whole = subprocess.run(args(tmp_path / "whole"), cwd=ROOT, capture_output=True, text=True, check=False)
    assert whole.returncode == 0, whole.stderr
    run_dir = tmp_path / "killed" / "PointGoal" / "lora" / "seed0"
    process = subprocess.Popen(
        args(tmp_path / "killed"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list(run_dir.glob("checkpoints/*/state.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = json.loads(max(run_dir.glob("checkpoints/*/state.json"), key=lambda p: int(p.parent.name)).read_text())
    assert 0 < state["num_timesteps"] < 16384 and not (run_dir / "result.json").exists()

    refused = subprocess.run(args(tmp_path / "killed"), cwd=ROOT, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run([*args(tmp_path / "killed"), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((run_dir / "result.json").read_text())
    expected_dir = tmp_path / "whole" / "PointGoal" / "lora" / "seed0"
    expected = json.loads((expected_dir / "result.json").read_text())
    # Exact: the checkpoint follows an update and carries the generators and the envs mid-episode, so the resumed
    # run makes every update and evaluation of the uninterrupted one (8 envs x 64 steps a rollout, 4 epochs each).
    assert result["eval_curve"] == expected["eval_curve"] and result["total_timesteps"] == 16384
    from stable_baselines3 import PPO

    updates = [PPO.load(d / "model.zip", device="cpu")._n_updates for d in (run_dir, expected_dir)]
    assert updates == [4 * 16384 // (8 * 64)] * 2

    def points(folder: Path) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in EventAccumulator(str(folder)).Reload().Scalars("eval/mean_return")]

    assert points(run_dir) == points(expected_dir), "one TensorBoard point per evaluation, the killed run's purged"


def test_space_mismatch_stops_with_both_spaces(point_agent: Path) -> None:
    done = run_cli("finetune.py", "--env", "CartPole-v1", "--pretrained", str(point_agent), *TINY)
    assert done.returncode == 2
    assert "pretrained agent: Box" in done.stderr and "(6,)" in done.stderr and "(4,)" in done.stderr


def test_missing_and_corrupt_agents_are_clear_errors(tmp_path: Path) -> None:
    missing = run_cli("finetune.py", "--env", "CartPole-v1", "--pretrained", str(tmp_path / "nope.zip"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    broken = run_cli("finetune.py", "--env", "CartPole-v1", "--pretrained", str(corrupt))
    assert broken.returncode == 2 and "is not an SB3 zip" in broken.stderr
    assert "Traceback" not in broken.stderr + missing.stderr


def test_bad_yaml_value_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "task.yaml"
    config.write_text("target_env: CartPole-v1\ntotal_timesteps: -5\n")
    done = run_cli("finetune.py", "--env", "x", "--config", str(config))
    assert done.returncode == 2
    assert "total_timesteps=-5 is invalid: expected an integer >= 1" in done.stderr and str(config) in done.stderr
    config.write_text("target_env: CartPole-v1\nlora: {r: 0}\n")
    done = run_cli("finetune.py", "--env", "x", "--config", str(config))
    assert done.returncode == 2 and "LoraConfig.r=0 is invalid" in done.stderr
    config.write_text("target_env: CartPole-v1\nppo: {n_step: 64}\n")
    done = run_cli("finetune.py", "--env", "x", "--config", str(config))
    assert done.returncode == 2 and "unknown algorithm argument(s) ['n_step'] in ppo" in done.stderr
    config.write_text("target_env: CartPole-v1\nlearning_rate: 0.1\n")
    done = run_cli("finetune.py", "--env", "x", "--config", str(config))
    assert done.returncode == 2 and "unknown key(s) ['learning_rate']" in done.stderr


def test_pretrain_and_finetune_help_work() -> None:
    for script in ("pretrain.py", "finetune.py"):
        done = run_cli(script, "--help")
        assert done.returncode == 0 and "--env" in done.stdout


def test_eva_rl_inspect_prints_the_allocation_and_writes_a_png(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eva_rl",
            "inspect",
            "--env",
            "MiniGrid-DoorKey",
            "--no-progress",
            "--out",
            str(tmp_path / "alloc.png"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["layer", "fan-in", "rank", "captured", "tracked", "batches"]
    rows = [line.split() for line in lines[2:] if line.startswith(("features", "mlp", "action", "value"))]
    assert len(rows) == 10 and sum(int(row[2]) for row in rows) == 40
    assert (tmp_path / "alloc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eva_rl_merge_writes_a_plain_zip_that_acts_like_the_run(doorkey_runs: Path, tmp_path: Path) -> None:
    run_dir = doorkey_runs / "eva" / "seed0"
    done = subprocess.run(
        [sys.executable, "-m", "eva_rl", "merge", str(run_dir), "--out", str(tmp_path / "m.zip")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    check = (
        "import sys, numpy as np; from stable_baselines3 import PPO\n"
        "m = PPO.load(sys.argv[1], device='cpu'); a = PPO.load(sys.argv[2], device='cpu')\n"
        "obs = np.random.default_rng(0).integers(0, 2, size=(64, 20, 7, 7)).astype(np.float32)\n"
        "assert type(m.policy).__module__.startswith('stable_baselines3'), type(m.policy)\n"
        "assert not any('lora' in k for k in m.policy.state_dict())\n"
        "print((m.predict(obs, deterministic=True)[0] == a.predict(obs, deterministic=True)[0]).all())\n"
    )
    compared = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "m.zip"), str(run_dir / "model.zip")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert compared.returncode == 0, compared.stderr
    assert compared.stdout.strip() == "True"


def test_record_writes_gifs_and_puts_them_in_tensorboard(doorkey_runs: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from eva_rl.experiments.cli import main

    run_dir = doorkey_runs / "eva" / "seed0"
    assert main(["record", str(run_dir), "--max-steps", "12"]) == 0
    assert f"video: {run_dir / 'before_after.gif'}" in capsys.readouterr().out
    with Image.open(run_dir / "agent.gif") as gif:
        assert 2 <= gif.n_frames <= 13 and gif.size == (256, 256)  # DoorKey-8x8 renders 8 tiles of 32 pixels
    with Image.open(run_dir / "before_after.gif") as gif:
        assert gif.size[0] == 512, "the pretrained agent beside the fine-tuned one"
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    steps = [image.step for image in events.Images("video/agent")]
    assert steps == [0, json.loads((run_dir / "result.json").read_text())["total_timesteps"]]


def test_a_task_files_env_package_imports_from_any_working_directory(tmp_path: Path) -> None:
    """PointGoal's task file names env_packages: [envs], the project's own package: it must import from elsewhere."""
    code = "from eva_rl.experiments.cli import main; import sys; sys.exit(main(['inspect', '--env', 'PointGoal', " \
        "'--no-progress', '--out', 'allocation.png']))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "allocation.png").is_file()


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s living child processes (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_workers_die_with_a_killed_main_process_and_free_their_runs(tmp_path: Path) -> None:
    from eva_rl.experiments.run_folder import RunFolder

    argv = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--env", "PointGoal", "--methods", "eva,lora"]
    argv += ["--workers", "2", "--total-timesteps", "262144", "--log-dir", str(tmp_path), "--no-progress"]
    main = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = [RunFolder.of(tmp_path, "PointGoal", method, 0) for method in ("eva", "lora")]
    deadline = time.time() + 120
    while not all((run.path / "settings.json").exists() for run in runs) and time.time() < deadline:
        time.sleep(0.1)
    workers = _children(main.pid)
    assert len(workers) >= 2 and main.poll() is None
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.time() + 10
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived the process that started them"
    for run in runs:
        with run.lock():  # free: a resumed run can take it
            pass
