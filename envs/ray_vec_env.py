"""RayVecEnv: a stable-baselines3 ``VecEnv`` whose sub-environments each live in a Ray actor.

An off-policy algorithm (DDPG) collects N episodes at once, each on its own worker, with the
semantics of SB3's ``SubprocVecEnv``; a worker that dies is replaced and its episode replayed.
This module knows environments only (Gymnasium, SB3, Ray), nothing of autoprune's tasks::

    ray.init()  # or ray.init(address="auto"): the caller connects
    venv = RayVecEnv([make_env] * 4, worker_setup=lambda: torch.set_num_threads(1))
    DDPG("MlpPolicy", venv, train_freq=(1, "episode")).learn(10_000)
    venv.close()
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import ray
from gymnasium import spaces
from ray.exceptions import RayActorError, RayError, RayTaskError
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

logger = logging.getLogger(__name__)

RngState = Mapping[str, Any]
"""The state of a numpy bit generator (``np.random.Generator.bit_generator.state``)."""

CLOSE_TIMEOUT_S = 30.0
"""How long ``close()`` waits for the sub-environments' own ``close()`` before killing actors."""


class RayVecEnvError(RuntimeError):
    """A sub-environment failed: its env raised, could not be built, or its actor kept dying."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"sub-env {index}: {message}")
        self.index = index


@dataclass
class _Episode:
    """What the driver keeps to rebuild one sub-env's current episode in a fresh actor.

    ``rng_state`` is the state of the base env's ``np_random`` just before an unseeded reset
    (an auto-reset at an episode end, or ``reset()`` without ``seed()``), so that the replayed
    reset draws the same numbers.
    """

    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    rng_state: RngState | None = None
    actions: list[np.ndarray] = field(default_factory=list)


def _get_rng_state(env: gym.Env) -> RngState | None:
    """The state of the base env's ``np_random`` generator, or None if it has none."""
    try:
        return deepcopy(env.unwrapped.np_random.bit_generator.state)
    except AttributeError:
        return None


def _set_rng_state(env: gym.Env, state: RngState) -> None:
    """Put the base env's ``np_random`` generator in ``state``."""
    env.unwrapped.np_random.bit_generator.state = state


class _EnvWorker:
    """One sub-environment inside a Ray actor: the remote side of :class:`RayVecEnv`.

    Its commands mirror SB3's ``SubprocVecEnv`` worker (``subproc_vec_env._worker``).
    """

    def __init__(
        self, env_fn: Callable[[], gym.Env], worker_setup: Callable[[], None] | None
    ) -> None:
        if worker_setup is not None:
            worker_setup()
        env = env_fn()
        self.env: gym.Env = env if is_wrapped(env, Monitor) else Monitor(env)

    def spaces(self) -> tuple[spaces.Space, spaces.Space]:
        """The observation and action spaces."""
        return self.env.observation_space, self.env.action_space

    def reset(
        self, seed: int | None, options: dict[str, Any]
    ) -> tuple[Any, dict[str, Any], RngState | None]:
        """Reset; also return the generator state before an unseeded reset (for replay)."""
        rng_state = _get_rng_state(self.env) if seed is None else None
        maybe_options = {"options": options} if options else {}
        obs, info = self.env.reset(seed=seed, **maybe_options)
        return obs, info, rng_state

    def step(
        self, action: np.ndarray
    ) -> tuple[Any, float, bool, dict[str, Any], dict[str, Any] | None, RngState | None]:
        """Step; at an episode end store the final obs in ``info`` and reset (without seed).

        Returns obs, reward, done, info, then the reset info and the generator state before
        the auto-reset (both None unless done).
        """
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = bool(terminated or truncated)
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info, rng_state = None, None
        if done:
            info["terminal_observation"] = obs
            obs, reset_info, rng_state = self.reset(None, {})
        return obs, float(reward), done, info, reset_info, rng_state

    def restore(self, episode: _Episode) -> None:
        """Replay an episode recorded by the driver: its reset, then its actions."""
        if episode.seed is None and episode.rng_state is not None:
            _set_rng_state(self.env, episode.rng_state)
        self.reset(episode.seed, episode.options)
        for action in episode.actions:
            self.env.step(action)

    def render(self) -> Any:
        """The env's rendering."""
        return self.env.render()

    def get_attr(self, name: str) -> Any:
        """An attribute of the env or of the first wrapper that has it."""
        return self.env.get_wrapper_attr(name)

    def has_attr(self, name: str) -> bool:
        """Whether the env or one of its wrappers has the attribute."""
        try:
            self.env.get_wrapper_attr(name)
        except AttributeError:
            return False
        return True

    def set_attr(self, name: str, value: Any) -> None:
        """Set the attribute where it is defined (the env below Monitor), else on the top."""
        self.env.set_wrapper_attr(name, value)

    def env_method(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call a method of the env (or of the first wrapper that has it)."""
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class: type[gym.Wrapper]) -> bool:
        """Whether the env is wrapped with ``wrapper_class``."""
        return is_wrapped(self.env, wrapper_class)

    def close(self) -> None:
        """Close the env."""
        self.env.close()


class RayVecEnv(VecEnv):
    """A vectorised environment whose sub-environments each live in a Ray actor.

    It follows the ``VecEnv`` contract of stable-baselines3 with the semantics of
    ``SubprocVecEnv``: ``step_async`` sends every sub-env its action at once, ``step_wait``
    gathers the results; when a sub-env's episode ends (terminated or truncated),
    ``info["terminal_observation"]`` holds the final observation,
    ``info["TimeLimit.truncated"]`` is ``truncated and not terminated``, the sub-env is reset
    without seed, its reset observation returned and its reset info stored in ``reset_infos``.
    ``seed()`` and ``set_options()`` apply at the next ``reset()`` only.

    Each actor runs ``worker_setup()`` (e.g. to pin torch threads), builds its env with its
    ``env_fn`` (sent by Ray with cloudpickle, as ``SubprocVecEnv`` does) and wraps it in SB3's
    ``Monitor`` unless it already is, so ``info["episode"]`` appears at every episode end.
    ``get_attr`` / ``env_method`` reach the env through its wrappers (``get_wrapper_attr``);
    ``set_attr`` sets the attribute where it is defined (Gymnasium's ``set_wrapper_attr``),
    so it changes the env below the implicit Monitor rather than shadowing it.

    Ray workers must be able to import what ``env_fns`` refer to (an installed package, or
    code pickled by value: functions and classes of a script's ``__main__``, or of a module
    registered with ``ray.cloudpickle.register_pickle_by_value``).

    Observations must be arrays (``Box``, ``Discrete``, ``MultiBinary``, ``MultiDiscrete``);
    ``Dict`` and ``Tuple`` observation spaces are not supported.

    **Fault tolerance.** The driver keeps, per sub-env, the seed and options of its last reset
    and the actions taken since. If an actor dies (``RayActorError``: killed, its process or node
    lost), a new actor is started, resets with that seed and options, re-applies those actions
    and then performs the pending call, so a deterministic env continues exactly as if nothing
    had happened; ``restarts`` counts the replacements. For an unseeded reset (the auto-reset at
    an episode end, or ``reset()`` without ``seed()``) the actor returns the state of the base
    env's ``np_random`` before it, and the replay restores that state first. Replay is
    therefore exact when the env is deterministic given its ``np_random`` and its actions;
    it is not exact for randomness from other sources (global numpy/torch/python RNGs, clocks),
    for state an env carries from one episode into the next, or for changes made through
    ``set_attr`` / ``env_method`` (not recorded). Monitor's running totals restart in a new
    actor. A replay re-runs the steps of the current episode, so it costs up to one episode.
    After ``max_restarts`` replacements of one sub-env a :class:`RayVecEnvError` is raised.
    An exception raised by the env itself is not retried: it is raised at once as a
    :class:`RayVecEnvError` (a ``RuntimeError``) naming the sub-env and the original error
    (``AttributeError`` for a missing attribute in ``get_attr`` / ``env_method``).

    :param env_fns: one function per sub-env that builds it
    :param actor_options: Ray actor options (``num_cpus`` defaults to 1); Ray's own
        ``max_restarts`` / ``max_task_retries`` are refused, since a silently restarted actor
        would lose its env's state
    :param worker_setup: called in each actor before its env is built
    :param max_restarts: replacements allowed per sub-env
    :raises RuntimeError: if Ray is not initialised (the caller connects: ``ray.init(...)``)
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        actor_options: dict[str, Any] | None = None,
        worker_setup: Callable[[], None] | None = None,
        max_restarts: int = 3,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayVecEnv needs a Ray connection: call ray.init(...) first")
        if not env_fns:
            raise ValueError("RayVecEnv needs at least one env_fn")
        options = {"num_cpus": 1, **(actor_options or {})}
        if options.get("max_restarts") or options.get("max_task_retries"):
            raise ValueError(
                "RayVecEnv replaces dead actors itself and replays their episode; Ray's own "
                "max_restarts / max_task_retries would restart them with a fresh env silently"
            )
        self._actor_class: Any = ray.remote(_EnvWorker).options(**options)
        self._env_fns = list(env_fns)
        self._worker_setup = worker_setup
        self.max_restarts = max_restarts
        self.restarts = 0
        self._restarts_per_env = [0] * len(env_fns)
        self._episodes: list[_Episode | None] = [None] * len(env_fns)
        self._pending: list[ray.ObjectRef] = []
        self._actions: list[np.ndarray] = []
        self.waiting = False
        self.closed = False
        self.actors: list[ray.actor.ActorHandle] = [
            self._start_actor(i) for i in range(len(env_fns))
        ]
        try:
            observation_space, action_space = self._call("spaces", [0], [()])[0]
            if isinstance(observation_space, (spaces.Dict, spaces.Tuple)):
                raise ValueError("RayVecEnv supports array observations, not Dict/Tuple spaces")
            # VecEnv.__init__ reads render_mode from every actor: it waits for all envs.
            super().__init__(len(env_fns), observation_space, action_space)
        except BaseException:
            self.close()  # do not leak the actors (and their CPUs) of a failed construction
            raise

    # -- the VecEnv contract -------------------------------------------------------------------

    def reset(self) -> VecEnvObs:
        """Reset every sub-env with the seeds/options set by ``seed()`` / ``set_options()``."""
        self._drain()
        indices = list(range(self.num_envs))
        calls = [(self._seeds[i], deepcopy(self._options[i])) for i in indices]
        results = self._call("reset", indices, calls)
        for i, ((seed, options), (_, info, rng_state)) in enumerate(
            zip(calls, results, strict=True)
        ):
            self._episodes[i] = _Episode(seed, options, rng_state)
            self.reset_infos[i] = info
        # Seeds and options are only used once (as in SubprocVecEnv).
        self._reset_seeds()
        self._reset_options()
        return np.stack([obs for obs, _, _ in results])

    def step_async(self, actions: np.ndarray) -> None:
        """Send every sub-env its action; the actors step concurrently."""
        self._actions = [np.array(action, copy=True) for action in actions]
        self._pending = [
            actor.step.remote(action)
            for actor, action in zip(self.actors, self._actions, strict=True)
        ]
        self.waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        """Gather the steps; replace dead actors; raise the first sub-env error, if any."""
        results: list[Any] = []
        error: RayVecEnvError | None = None
        for i, ref in enumerate(self._pending):
            try:
                result = self._get(i, ref, "step", (self._actions[i],))
            except RayVecEnvError as err:
                error = error or err
                continue
            self._record_step(i, result)
            results.append(result)
        self._pending, self.waiting = [], False
        if error is not None:
            raise error
        obs, rewards, dones, infos, _, _ = zip(*results, strict=True)
        return np.stack(obs), np.stack(rewards), np.stack(dones), list(infos)

    def close(self) -> None:
        """Close the sub-envs and kill their actors."""
        if self.closed:
            return
        self._drain()
        with contextlib.suppress(RayError):
            ray.get([actor.close.remote() for actor in self.actors], timeout=CLOSE_TIMEOUT_S)
        for actor in self.actors:
            with contextlib.suppress(RayError, ValueError):
                ray.kill(actor)
        self.closed = True

    def get_images(self) -> Sequence[np.ndarray | None]:
        """Each sub-env's RGB image (``[None] * n`` unless its render_mode is rgb_array)."""
        if self.render_mode != "rgb_array":
            warnings.warn(
                f"The render mode is {self.render_mode}, but this method assumes it is "
                "`rgb_array` to obtain images.",
                stacklevel=2,
            )
            return [None] * self.num_envs
        return self._call("render", list(range(self.num_envs)), [()] * self.num_envs)

    def has_attr(self, attr_name: str) -> bool:
        """Whether every sub-env (or one of its wrappers) has the attribute."""
        results = self._call("has_attr", list(range(self.num_envs)), [(attr_name,)] * self.num_envs)
        return all(results)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The attribute of each sub-env in ``indices``."""
        targets = list(self._get_indices(indices))
        return self._call("get_attr", targets, [(attr_name,)] * len(targets))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set the attribute in each sub-env in ``indices`` (not replayed after a restart)."""
        targets = list(self._get_indices(indices))
        self._call("set_attr", targets, [(attr_name, value)] * len(targets))

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        """Call a method of each sub-env in ``indices`` (not replayed after a restart)."""
        targets = list(self._get_indices(indices))
        call = (method_name, method_args, method_kwargs)
        return self._call("env_method", targets, [call] * len(targets))

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        """Whether each sub-env in ``indices`` is wrapped with ``wrapper_class``."""
        targets = list(self._get_indices(indices))
        return self._call("is_wrapped", targets, [(wrapper_class,)] * len(targets))

    # -- actors, calls and recovery ------------------------------------------------------------

    def _start_actor(self, index: int) -> ray.actor.ActorHandle:
        """Start the actor of one sub-env (it builds the env asynchronously)."""
        return self._actor_class.remote(self._env_fns[index], self._worker_setup)

    def _call(self, method: str, indices: list[int], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Call ``method`` on the actors of ``indices`` concurrently and gather the results."""
        refs = [
            getattr(self.actors[i], method).remote(*args)
            for i, args in zip(indices, calls, strict=True)
        ]
        return [
            self._get(i, ref, method, args)
            for i, ref, args in zip(indices, refs, calls, strict=True)
        ]

    def _get(self, index: int, ref: ray.ObjectRef, method: str, args: tuple[Any, ...]) -> Any:
        """Wait for one call; if its actor died, replace it, restore the env and call again."""
        while True:
            try:
                return ray.get(ref)
            except RayTaskError as err:
                raise self._env_error(index, method, err) from err
            except RayActorError as err:
                if err.actor_init_failed:
                    raise RayVecEnvError(index, f"building its env failed: {err}") from err
                self._replace_actor(index, err, replay=method not in ("reset", "restore"))
                ref = getattr(self.actors[index], method).remote(*args)

    def _replace_actor(self, index: int, err: RayActorError, replay: bool) -> None:
        """Start a new actor for a sub-env and replay its current episode there."""
        if self._restarts_per_env[index] >= self.max_restarts:
            raise RayVecEnvError(
                index,
                f"its actor died and max_restarts={self.max_restarts} replacements are used "
                f"up; giving up. Last error: {err}",
            ) from err
        with contextlib.suppress(RayError, ValueError):
            ray.kill(self.actors[index])
        self._restarts_per_env[index] += 1
        self.restarts += 1
        logger.warning("sub-env %d: actor died (%s); replacing it", index, type(err).__name__)
        self.actors[index] = self._start_actor(index)
        episode = self._episodes[index]
        if replay and episode is not None:
            self._get(index, self.actors[index].restore.remote(episode), "restore", (episode,))

    @staticmethod
    def _env_error(index: int, method: str, err: RayTaskError) -> Exception:
        """The error to raise for an exception raised inside a sub-env (never retried)."""
        cause = err.cause
        message = f"{method} raised {type(cause).__name__}: {cause}"
        if isinstance(cause, AttributeError) and method in ("get_attr", "env_method"):
            # VecEnv.__init__ and has_attr rely on AttributeError, as with DummyVecEnv.
            return AttributeError(f"sub-env {index}: {message}")
        return RayVecEnvError(index, message)

    def _record_step(self, index: int, result: tuple[Any, ...]) -> None:
        """Record a step for replay: a new (unseeded) episode if it ended, else its action."""
        _, _, done, _, reset_info, rng_state = result
        if done:
            self._episodes[index] = _Episode(None, {}, rng_state)
            self.reset_infos[index] = reset_info
        else:
            episode = self._episodes[index]
            if episode is not None:
                episode.actions.append(self._actions[index])

    def _drain(self) -> None:
        """Wait for (and drop) the results of a pending ``step_async``."""
        for ref in self._pending:
            with contextlib.suppress(RayError):
                ray.get(ref)
        self._pending, self.waiting = [], False
