"""The programmatic-reuse example runs and learns: user code, its own reward, its own loop, no config object."""

from experiments.examples import custom_reward_grpo


def test_custom_reward_grpo_learns():
  means = custom_reward_grpo.main(iterations=12, log=lambda _: None)
  assert len(means) == 12
  # a random byte-level policy emits 'a' ~1/260 of the time; GRPO on this reward raises it clearly
  assert sum(means[-3:]) / 3 > max(3 * sum(means[:3]) / 3, 0.05), means
