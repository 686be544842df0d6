"""The ddpg searcher: it learns, keeps the best policy within budget, saves and warm-starts."""

from __future__ import annotations

import numpy as np
import pytest
from autoprune.agents import SearchError, search
from autoprune.agents.amc import EpisodeCreditBuffer, TruncatedNormalNoise


@pytest.fixture(scope="module")
def trained(default_task, tmp_path_factory):
    path = tmp_path_factory.mktemp("agent") / "agent.zip"
    result = search(
        "ddpg", default_task, "flops=0.5", seed=0, evaluations=100, warmup_episodes=25,
        save_to=str(path),
    )  # fmt: skip
    return result, path


def test_ddpg_learns_and_meets_budget(default_task, trained):
    result, _ = trained
    assert result.evaluations == 100 and len(result.history) == 100
    warm = [r.accuracy for r in result.history if r.note == "warm-up"]
    late = [r.accuracy for r in result.history[-25:]]
    assert len(warm) == 25
    assert np.mean(late) > np.mean(warm)
    assert result.best is not None and result.best.accuracy == max(
        r.accuracy for r in result.history if r.meets_budget
    )
    vec = result.policy().check(default_task)
    assert default_task.cost_ratios(vec)["flops"] <= 0.5 + 1e-9


def test_ddpg_same_seed_same_search(default_task):
    runs = [
        search("ddpg", default_task, "flops=0.5", seed=3, evaluations=8, warmup_episodes=4)
        for _ in range(2)
    ]
    assert [r.accuracy for r in runs[0].history] == [r.accuracy for r in runs[1].history]


def test_ddpg_save_and_warm_start(default_task, trained):
    _, path = trained
    assert path.is_file()
    result = search("ddpg", default_task, "flops=0.5", seed=1, evaluations=5, warm_start=str(path))
    assert result.evaluations == 5 and result.best is not None
    assert result.best.flops_ratio <= 0.5 + 1e-9


def test_ddpg_plain_td3_switches(default_task):
    result = search(
        "ddpg", default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=2,
        algo="td3", noise="normal", episode_credit=False, baseline=False,
    )  # fmt: skip
    assert result.evaluations == 6


def test_ddpg_bad_input(default_task, tmp_path):
    with pytest.raises(SearchError, match="not larger than the warm-up of 100"):
        search("ddpg", default_task, "flops=0.5", evaluations=50)
    with pytest.raises(SearchError, match="needs an evaluation budget"):
        search("ddpg", default_task, "flops=0.5")
    with pytest.raises(SearchError, match="unknown option"):
        search("ddpg", default_task, "flops=0.5", evaluations=5, warmup=1)
    with pytest.raises(SearchError, match="warm_start agent not found"):
        search("ddpg", default_task, "flops=0.5", evaluations=5, warm_start=str(tmp_path / "x"))
    with pytest.raises(SearchError, match="unknown searcher 'dqn'"):
        search("dqn", default_task, "flops=0.5")


def test_truncated_noise_stays_in_bounds():
    noise = TruncatedNormalNoise(0.5, seed=0)
    samples = np.array([noise.around(np.array([[0.9]])) for _ in range(500)]).ravel()
    assert samples.min() >= -1 and samples.max() <= 1
    assert abs(np.median(samples) - 0.9) < 0.6


def test_episode_credit_buffer_credits_every_step():
    from gymnasium import spaces

    obs_space = spaces.Box(0, 1, (2,), np.float32)
    act_space = spaces.Box(-1, 1, (1,), np.float32)
    buf = EpisodeCreditBuffer(100, obs_space, act_space, "cpu", n_envs=1, baseline_alpha=None)
    obs = np.zeros((1, 2), np.float32)
    for t in range(3):
        reward = np.array([0.7 if t == 2 else 0.0])
        buf.add(obs, obs, np.zeros((1, 1)), reward, np.array([t == 2]), [{}])
    assert buf.size() == 3
    assert np.allclose(buf.rewards[:3, 0], 0.7) and buf.dones[:3, 0].all()


def test_gradient_steps_per_episode(default_task):
    """AMC's one update per transition (12 units: 12 per learned episode), or a fixed count."""
    from autoprune.agents.ddpg import DDPGSearcher

    updates = {}
    for steps in (None, 1, 3):
        searcher = DDPGSearcher(default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=2,
                                gradient_steps=steps)  # fmt: skip
        searcher.run()
        assert searcher.model is not None
        updates[steps] = searcher.model._n_updates
    rounds = updates[1]  # one training round per learned episode
    assert rounds >= 3
    assert updates == {None: 12 * rounds, 1: rounds, 3: 3 * rounds}


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"gradient_steps": 0}, "gradient_steps=0: Input should be greater than or equal to 1"),
        ({"gradient_steps": "many"}, "gradient_steps='many': Input should be a valid integer"),
        ({"reward": "bogus"}, "unknown reward 'bogus'"),
        ({"net_arch": [64, 0]}, "net_arch.1=0"),
        ({"algo": "sac"}, "algo='sac': Input should be 'ddpg' or 'td3'"),
        ({"elite_prob": 1.5}, "elite_prob=1.5: Input should be less than or equal to 1"),
        ({"elite_prob": 0.5, "algo": "td3"}, "elite_prob needs algo ddpg"),
    ],
)
def test_malformed_options_are_refused_clearly(default_task, options, words):
    with pytest.raises(SearchError, match=words.replace("(", r"\(").replace(")", r"\)")):
        search("ddpg", default_task, "flops=0.5", evaluations=6, warmup_episodes=2, **options)


@pytest.mark.parametrize("episode_credit", [True, False])
def test_replay_buffer_holds_the_applied_actions(default_task, episode_credit):
    """Under a tight budget AMC's clipping raises many proposed ratios: the buffer must hold the
    actions the environment applied, not those the agent proposed (logged at the env here)."""
    from autoprune.agents.ddpg import DDPGSearcher

    # fill_budget off: the buffer then holds each step's applied action (with it, the filled
    # ratios of the whole episode: test_fill_budget_policies_sit_on_the_budget_...)
    searcher = DDPGSearcher(default_task, "flops=0.25", seed=0, evaluations=6, warmup_episodes=3,
                            episode_credit=episode_credit, fill_budget=False)  # fmt: skip
    env, steps = searcher.env, []
    original = env.step

    def logged(action):
        out = original(action)
        steps.append((float(np.asarray(action).reshape(-1)[0]), out[-1]["ratio"]))
        return out

    env.step = logged
    searcher.run()
    assert searcher.model is not None
    buffer = searcher.model.replay_buffer
    stored = buffer.actions[: buffer.pos, 0, 0]
    assert len(stored) >= 4 * len(default_task.units)  # the transitions of the first episodes
    max_ratio = env.max_ratio
    proposed = np.array([a for a, _ in steps[: len(stored)]])
    applied = np.array([2.0 * r / max_ratio - 1.0 for _, r in steps[: len(stored)]])
    np.testing.assert_allclose(stored, applied, atol=1e-5)
    assert np.abs(np.clip(proposed, -1, 1) - applied).max() > 0.1  # clipping moved some


def _standardized(rewards: list[float]) -> np.ndarray:
    """Reference: each reward standardised by the mean and std of the rewards up to it."""
    r = np.asarray(rewards, dtype=float)
    return np.array([(r[k] - r[: k + 1].mean()) / max(r[: k + 1].std(), 1e-3)
                     for k in range(len(r))])  # fmt: skip


def test_standardize_credits_each_episode_its_standardised_reward(default_task):
    from autoprune.agents.ddpg import DDPGSearcher

    buffer = EpisodeCreditBuffer(10, *_spaces(), standardize=True)
    rewards = [0.31, 0.55, 0.12, 0.55, 0.9, 0.47]
    np.testing.assert_allclose([buffer.credit(x) for x in rewards], _standardized(rewards))

    # in a search: every transition of an episode holds that episode's standardised reward
    searcher = DDPGSearcher(default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=3,
                            standardize=True)  # fmt: skip
    env, ends = searcher.env, []
    original = env.step

    def logged(action):
        out = original(action)
        if out[2]:
            ends.append(float(out[1]))
        return out

    env.step = logged
    searcher.run()
    assert searcher.model is not None
    buffer = searcher.model.replay_buffer
    units = len(default_task.units)
    stored = buffer.rewards[: buffer.pos, 0].reshape(-1, units)
    assert len(stored) >= 4 and len(ends) >= len(stored)
    np.testing.assert_allclose(stored, np.repeat(_standardized(ends)[: len(stored), None], units,
                                                 axis=1), rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(SearchError, match="standardize credits the episode's reward"):
        search("ddpg", default_task, "flops=0.5", evaluations=4, warmup_episodes=1,
               episode_credit=False, standardize=True)  # fmt: skip
    with pytest.raises(SearchError, match="replaces the moving-average baseline; leave baseline"):
        search("ddpg", default_task, "flops=0.5", evaluations=4, warmup_episodes=1,
               baseline=False, standardize=True)  # fmt: skip
    with pytest.raises(SearchError, match="keeps the replay buffer settings it was saved with"):
        search("ddpg", default_task, "flops=0.5", evaluations=4, warm_start="agent.zip",
               standardize=True)  # fmt: skip


def _spaces():
    from gymnasium import spaces

    return spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-1, 1, (1,), np.float32)


def test_elite_exploration_searches_around_the_best_policy(default_task):
    """elite_prob=1: every episode after the warm-up is the best policy so far plus small noise;
    elite_prob=0 (AMC) explores around the actor, far from it."""
    budget, n = "flops=0.5", 16
    distance = {}
    for prob in (0.0, 1.0):
        result = search(
            "ddpg", default_task, budget, seed=0, evaluations=n, warmup_episodes=8,
            sigma=0.01, sigma_decay=1.0, elite_prob=prob,
        )  # fmt: skip
        gaps = []
        for i, rec in enumerate(result.history[8:], 8):
            earlier = [r for r in result.history[:i] if r.meets_budget]
            best = max(earlier, key=lambda r: r.accuracy)
            mine = default_task.ratio_vector(rec.ratios)
            gaps.append(np.abs(mine - default_task.ratio_vector(best.ratios)).mean())
        distance[prob] = float(np.mean(gaps))
        assert result.evaluations == n and result.best is not None
    assert distance[1.0] < 0.02 < distance[0.0], distance


def test_the_loss_reward_is_minus_the_search_cross_entropy(default_task):
    """reward='loss': every episode's reward is minus the mean cross-entropy of its pruned,
    BN-recalibrated model on the search split, computed here with torch alone."""
    import torch
    import torch.nn.functional as F

    from autoprune.training import recalibrate_bn

    result = search(
        "ddpg", default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=3,
        reward="loss",
    )  # fmt: skip
    assert len(result.history) == 6 and result.best is not None
    cfg = default_task.config.eval
    x_bn, _ = default_task.data.subset("train", cfg.bn_batches * cfg.bn_batch_size,
                                       seed=default_task.config.seed)  # fmt: skip
    split = default_task.search_split
    for rec in (result.history[0], result.history[-1]):
        model = default_task.prune(rec.ratios)
        recalibrate_bn(
            model, x_bn, cfg.bn_batches, cfg.bn_batch_size, seed=default_task.config.seed
        )
        with torch.no_grad():
            ce = F.cross_entropy(model.eval()(split.x), split.y).item()
        assert rec.reward == pytest.approx(-ce, rel=1e-3, abs=1e-4)
    # accuracy still picks the best policy: the reward only drives the agent
    assert result.best.accuracy == max(r.accuracy for r in result.history if r.meets_budget)


def test_fill_budget_policies_sit_on_the_budget_and_are_what_the_buffer_holds(default_task):
    """fill_budget: every episode uses (nearly) the whole budget, and the replay buffer holds
    the filled ratios of each finished episode as its actions (not the per-step ones)."""
    from autoprune.agents.ddpg import DDPGSearcher

    searcher = DDPGSearcher(
        default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=3, fill_budget=True
    )
    result = searcher.run()
    assert all(0.47 <= r.flops_ratio <= 0.5 + 1e-9 for r in result.history)
    assert searcher.model is not None
    buffer, n = searcher.model.replay_buffer, len(default_task.units)
    stored = buffer.actions[: buffer.pos, 0, 0].reshape(-1, n)
    max_ratio = searcher.env.max_ratio
    space = default_task.space
    for episode, rec in zip(stored, result.history, strict=False):
        ratios = (episode.astype(np.float64) + 1.0) / 2.0 * max_ratio
        recorded = default_task.ratio_vector(rec.ratios)
        # the same channels removed, up to float32 storage at a channel-count step (the fill
        # lands exactly on one): at most one channel in one unit
        gap = np.abs(space.removed_counts(ratios) - space.removed_counts(recorded))
        assert gap.max() <= 1 and gap.sum() <= 1, gap
    with pytest.raises(SearchError, match="fill_budget needs episode_credit"):
        search("ddpg", default_task, "flops=0.5", evaluations=6, warmup_episodes=2,
               fill_budget=True, episode_credit=False)  # fmt: skip


def test_uniform_warmup_prior_explores_around_the_uniform_policy(default_task):
    """warmup_prior='uniform': warm-up episodes are the uniform policy plus noise of scale
    sigma (here small), while AMC's random warm-up spreads over the whole ratio range."""
    from autoprune.budget import Budget

    budget, n, warm = "flops=0.5", 8, 6
    uniform = Budget.parse(budget).uniform(
        lambda v: default_task.cost_ratios(v, ("flops",)), default_task.space.max_ratio,
        len(default_task.units),
    )  # fmt: skip
    spread = {}
    for prior in ("random", "uniform"):
        result = search(
            "ddpg", default_task, budget, seed=0, evaluations=n, warmup_episodes=warm,
            sigma=0.02, warmup_prior=prior,
        )  # fmt: skip
        warmups = [r for r in result.history if r.note == "warm-up"]
        assert len(warmups) == warm and result.best is not None
        # every unit but the last (the budget's clipping may raise it to meet the budget)
        gaps = [np.abs(default_task.ratio_vector(r.ratios) - uniform)[:-1].max() for r in warmups]
        spread[prior] = max(gaps)
        assert all(r.flops_ratio <= 0.5 + 1e-9 for r in result.history)
    assert spread["uniform"] < 0.06 < spread["random"], spread


def test_warmup_prior_is_refused_clearly(default_task):
    with pytest.raises(SearchError, match="warmup_prior 'uniform' needs algo ddpg"):
        search("ddpg", default_task, "flops=0.5", evaluations=6, warmup_episodes=2,
               warmup_prior="uniform", algo="td3", noise="normal")  # fmt: skip
    with pytest.raises(SearchError, match="warmup_prior='prior'"):
        search("ddpg", default_task, "flops=0.5", evaluations=6, warmup_episodes=2,
               warmup_prior="prior")  # fmt: skip


@pytest.mark.parametrize("start", ["uniform", "best"])
def test_actor_start_puts_the_first_learned_episode_on_its_policy(default_task, start):
    """actor_start: the first episode after the warm-up (almost no noise) takes the uniform
    policy, or the best warm-up policy, while SB3's initial actor ('random') takes neither."""
    from autoprune.budget import Budget

    warm = 0 if start == "uniform" else 5
    uniform = Budget.parse("flops=0.5").uniform(
        lambda v: default_task.cost_ratios(v, ("flops",)), default_task.space.max_ratio,
        len(default_task.units),
    )  # fmt: skip
    gaps = {}
    for actor in ("random", start):
        result = search(
            "ddpg", default_task, "flops=0.5", seed=0, evaluations=warm + 1,
            warmup_episodes=warm, sigma=1e-4, sigma_decay=1.0, actor_start=actor,
            fill_budget=False,  # the episode as the actor takes it, not scaled onto the budget
        )  # fmt: skip
        first = default_task.ratio_vector(result.history[warm].ratios)
        target = uniform if start == "uniform" else default_task.ratio_vector(
            max(result.history[:warm], key=lambda r: r.accuracy).ratios)  # fmt: skip
        gaps[actor] = float(np.abs(first - target)[:-1].max())  # the last unit may be clipped
    # (the fit is close, not exact: within a few hundredths of a ratio)
    assert gaps[start] < 0.05 < gaps["random"], gaps


def test_actor_start_is_refused_clearly(default_task, tmp_path):
    with pytest.raises(SearchError, match="actor_start 'best' needs warm-up episodes"):
        search("ddpg", default_task, "flops=0.5", evaluations=4, warmup_episodes=0,
               actor_start="best")  # fmt: skip
    agent = tmp_path / "agent.zip"
    agent.write_bytes(b"")
    with pytest.raises(SearchError, match="a warm_start agent brings its own"):
        search("ddpg", default_task, "flops=0.5", evaluations=4, warm_start=str(agent),
               actor_start="uniform")  # fmt: skip


def test_observations_follow_the_episode_without_touching_it(default_task):
    from autoprune.envs import PruningEnv

    env = PruningEnv(default_task, "flops=0.5")
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, len(default_task.units))
    ratios = env.rollout(actions)  # what an episode of these actions applies
    expected = [env.reset(seed=0)[0]]
    for a in 2.0 * ratios / env.max_ratio - 1.0:
        obs, *_ = env.step(np.array([a], dtype=np.float32))
        expected.append(obs)
    env.reset()
    env.step(np.array([0.3], dtype=np.float32))  # an episode under way is left as it is
    before = env._observation()
    np.testing.assert_allclose(env.observations(ratios), np.stack(expected[:-1]), atol=1e-6)
    np.testing.assert_array_equal(env._observation(), before)


def test_defaults_beyond_amc_step_aside_for_explicit_options(default_task):
    """fill_budget and the uniform warm-up prior are defaults; options that rule them out turn
    them off when they were not asked for, and are refused when they were."""
    from autoprune.agents.ddpg import DDPGSearcher

    amc = DDPGSearcher(default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=2)
    assert amc.options.fill_budget is True and amc.options.warmup_prior == "uniform"
    assert amc.options.actor_start == "best"
    # no warm-up: no best warm-up policy to start the actor from (refused only when asked)
    cold = DDPGSearcher(default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=0)
    assert cold.options.actor_start == "random" and cold.options.warmup_prior == "uniform"
    plain = DDPGSearcher(default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=2,
                         algo="td3", noise="normal", episode_credit=False)  # fmt: skip
    assert plain.options.fill_budget is False and plain.options.warmup_prior == "random"
    with pytest.raises(SearchError, match="fill_budget needs episode_credit"):
        DDPGSearcher(default_task, "flops=0.5", seed=0, evaluations=6, warmup_episodes=2,
                     episode_credit=False, fill_budget=True)  # fmt: skip


def test_a_search_leaves_the_temp_directory_as_it_found_it(default_task, tmp_path, monkeypatch):
    """Without a logger of its own, SB3 configures one per model that creates an empty
    ``SB3-<date>`` folder in the temp directory: the searcher sets one that writes nowhere."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert tempfile.gettempdir() == str(tmp_path)
    (tmp_path / "already-here").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    result = search("ddpg", default_task, "flops=0.5", seed=0, evaluations=3, warmup_episodes=1)
    assert result.evaluations == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == before
