"""Videos of an agent acting on the target env, before and after fine-tuning: GIFs beside a run, and the same GIFs in
the run's TensorBoard (images tab: step 0 is the pretrained agent, the last step the fine-tuned one).

GIFs are written with Pillow and handed to TensorBoard as encoded images, as TensorBoard's own video summaries are,
so no video encoder is needed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from eva_rl.errors import ConfigError, EnvError
from eva_rl.experiments.environments import FrameRecorder, agent_env, import_packages, wrapper_chain
from eva_rl.experiments.run_folder import RunFolder, RunResult
from eva_rl.experiments.tasks import EvalSettings, TaskConfig, find_task
from eva_rl.experiments.trust import check_recorded_code, code_references, pickle_note
from eva_rl.files import atomic_write
from eva_rl.loading import PretrainedAgent, load_agent, load_pretrained

VIDEO_TAG = "video/agent"
"""The TensorBoard tag of the agent's GIFs (images tab)."""


def _recorder(venv: VecEnv) -> FrameRecorder:
    while isinstance(venv, VecEnvWrapper):
        venv = venv.venv
    if not isinstance(venv, DummyVecEnv):
        raise EnvError(f"cannot record frames from a {type(venv).__name__}")
    recorder = next((e for e in wrapper_chain(venv.envs[0]) if isinstance(e, FrameRecorder)), None)
    if recorder is None:
        raise EnvError("the env has no frame recorder; make it with render=True")
    return recorder


def record_episode(
    model: BaseAlgorithm,
    task: TaskConfig,
    agent: PretrainedAgent,
    seed: int,
    max_steps: int = 300,
    stats: Path | None = None,
) -> list[np.ndarray]:
    """The frames of one episode of ``model`` on the task's target env (``max_steps`` at most), with the agent's
    observation pipeline, an episode seed and an action-sampling seed of ``seed``.

    :param stats: VecNormalize statistics to use instead of the agent's (a fine-tuned run's own).
    :raises EnvError: if the env cannot render ``rgb_array`` frames.
    """
    with closing(agent_env(task, agent, 1, seed, evaluation=True, stats=stats, render=True)) as env:
        recorder = _recorder(env)
        env.seed(seed)
        observation = env.reset()
        steps = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            while steps < max_steps:
                action, _ = model.predict(observation, deterministic=task.eval.deterministic)
                observation, _, done, _ = env.step(action)
                steps += 1
                if done[0]:
                    break
        return recorder.frames[: steps + 1]  # the frame after the automatic reset belongs to the next episode


def gif_bytes(frames: Sequence[np.ndarray], fps: int = 12) -> bytes:
    """``frames`` as a looping GIF."""
    images = [Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return buffer.getvalue()


def side_by_side(clips: Sequence[Sequence[np.ndarray]], labels: Sequence[str]) -> list[np.ndarray]:
    """Clips played next to each other, each under its label; a shorter clip holds its last frame."""
    length = max(len(clip) for clip in clips)
    height = max(clip[0].shape[0] for clip in clips)
    band = 22
    frames = []
    for t in range(length):
        panels = []
        for clip, label in zip(clips, labels):
            frame = clip[min(t, len(clip) - 1)]
            panel = Image.new("RGB", (frame.shape[1], height + band), "white")
            panel.paste(Image.fromarray(frame), (0, band))
            caption = f"{label}  step {min(t, len(clip) - 1)}"
            if t >= len(clip) - 1 and len(clip) < length:
                caption = f"{label}  episode over at step {len(clip) - 1}"
            ImageDraw.Draw(panel).text((6, 5), caption, fill="black")
            panels.append(np.asarray(panel))
        frames.append(np.concatenate(panels, axis=1))
    return frames


def write_gif(frames: Sequence[np.ndarray], path: Path, fps: int = 12) -> Path:
    data = gif_bytes(frames, fps)
    atomic_write(path, lambda tmp: tmp.write_bytes(data), suffix=".gif")
    return path


def write_videos_to_tensorboard(run_dir: Path, clips: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
    """Put each ``(step, frames)`` clip as an animated image under :data:`VIDEO_TAG` into the run's TensorBoard, in
    an event file of their own that replaces the one an earlier recording wrote (no step shows two videos)."""
    for old in run_dir.glob(f"events.out.tfevents.*{_VIDEO_EVENTS}"):
        old.unlink()
    with closing(SummaryWriter(log_dir=str(run_dir), filename_suffix=_VIDEO_EVENTS)) as writer:
        for step, frames in clips:
            height, width = frames[0].shape[:2]
            image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif_bytes(frames))
            writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=VIDEO_TAG, image=image)]), step)


_VIDEO_EVENTS = ".videos"


def run_task(result: RunResult, trust_code: bool = False) -> tuple[TaskConfig, Path]:
    """The task and agent a completed run was made with, from its ``result.json``.

    :param trust_code: Import the env entry point and wrappers the run records from outside the trusted packages
        (:mod:`eva_rl.experiments.trust`).
    :raises ConfigError: for a run that records neither a known task nor its settings and agent, or names code it may
        not import.
    """
    task = find_task(result.task)
    settings = result.settings or {}
    if task is None and settings:
        recorded = code_references([settings.get("target_env"), *settings.get("wrappers", [])])
        check_recorded_code(recorded, f"run {result.task!r}'s {RunFolder.RESULT}", trust_code)
        task = TaskConfig(
            name=result.task,
            target_env=settings["target_env"],
            wrappers=settings.get("wrappers", []),
            env_kwargs=settings.get("env_kwargs", {}),
            eval=EvalSettings(**settings["eval"]),
        )
    agent = result.agent or (task.agent if task is not None else None)
    if task is None or agent is None:
        raise ConfigError(
            f"run of task {result.task!r} records neither a task in configs/ nor its settings and agent; it cannot "
            "be replayed"
        )
    return task, Path(agent)


def record_runs(
    run_dirs: Sequence[Path], max_steps: int = 300, seed: int | None = None, trust_code: bool = False
) -> list[Path]:
    """For each completed run: ``agent.gif`` (the fine-tuned agent) and ``before_after.gif`` (the pretrained agent
    beside it, the same episode seed) in the run folder, and both in its TensorBoard (the pretrained agent at step
    0, the fine-tuned one at the run's last step). The pretrained agent's episode is recorded once per task and seed.

    :param seed: Episode and sampling seed (default: the task's eval seed).
    :param trust_code: See :func:`run_task`.
    :return: The GIFs written.
    """
    written: list[Path] = []
    before: dict[tuple[str, int, str], list[np.ndarray]] = {}
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        if not folder.is_complete:
            raise ConfigError(
                f"{run_dir} holds no completed run (no {RunFolder.RESULT}); record runs once they finished"
            )
        result = folder.read_result()
        task, agent_path = run_task(result, trust_code)
        import_packages(task.env_packages)
        episode_seed = task.eval.seed if seed is None else seed
        pickle_note(agent_path)
        agent = load_pretrained(agent_path, device="cpu")
        pickle_note(folder.model_file, "model")
        model = load_agent(folder.model_file, device="cpu")
        after = record_episode(model, task, agent, episode_seed, max_steps, folder.stats())
        # The pretrained agent's episode is the same for every run of a task, seed and agent: recorded once.
        key = (task.name, episode_seed, str(agent_path))
        if key not in before:
            before[key] = record_episode(agent.model, task, agent, episode_seed, max_steps)
        written.append(write_gif(after, folder / RunFolder.AGENT_GIF))
        pair = side_by_side([before[key], after], ["pretrained", result.method])
        written.append(write_gif(pair, folder / RunFolder.BEFORE_AFTER_GIF))
        write_videos_to_tensorboard(run_dir, [(0, before[key]), (result.total_timesteps, after)])
    return written
