"""DQN on gymnasium's CartPole-v1, written after CleanRL's ``dqn_jax.py``.

The structure is CleanRL's: a Flax linen ``QNetwork(nn.Module)`` (Dense 120, relu,
Dense 84, relu, Dense n_actions), a ``flax.training.train_state.TrainState`` subclass
with a ``target_params`` field, optax's Adam, a linear epsilon schedule
``linear_schedule(start_e, end_e, duration, t)`` and one flat
``for global_step in range(args.steps):`` loop. Each turn explores with probability
epsilon (``env.action_space.sample()``, no JAX at all) or else acts greedily with
``q_network.apply(q_state.params, obs)`` and ``int(q_values.argmax())``, steps the
environment on the host, stores the transition in a NumPy ring replay buffer (CleanRL uses
stable-baselines3's) and resets the environment at the end of an episode, reading the
episodic return from ``RecordEpisodeStatistics``. After ``LEARNING_STARTS`` steps, every
``TRAIN_FREQUENCY``-th step samples a batch and calls ``update``: a TD target from the
target network, an MSE loss through ``jax.value_and_grad(mse_loss, has_aux=True)`` and
``q_state.apply_gradients``; the loss is fetched with ``float()`` every 10 steps (CleanRL
logs every 100). Every ``TARGET_NETWORK_FREQUENCY`` steps the target network is updated
with ``optax.incremental_update`` (TAU 1: a copy). The constants are scaled down from
CleanRL's so that even a 10-step run trains: updates from step 6 on, every second step,
batches of 32 sampled with replacement; epsilon falls from 1 to 0.05 over the first half
of the steps. ``--steps N`` is the number of environment steps; one per-step time per
environment step. All randomness comes from --seed: NumPy's generator (exploration,
buffer sampling), ``env.action_space.seed(seed)``, ``env.reset(seed=seed)`` on the first
reset, ``jax.random.PRNGKey(seed)`` for the initialisation. ``--jit`` is CleanRL's own
way: ``jax.jit`` of ``update`` and of ``q_network.apply``.

    python examples/lib_dqn_cleanrl.py --steps 30 [--jit] [--seed 0]
"""
import time

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from _common import checksum, param_change, parse_args, report

LEARNING_RATE, BUFFER_SIZE, GAMMA, TAU = 2.5e-4, 10_000, 0.99, 1.0
TARGET_NETWORK_FREQUENCY, BATCH, LEARNING_STARTS, TRAIN_FREQUENCY = 10, 32, 4, 2
START_E, END_E = 1.0, 0.05
LOG_EVERY = 10  # steps between fetches of the loss (CleanRL: 100)


class QNetwork(nn.Module):
    action_dim: int

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        x = nn.Dense(120)(x)
        x = nn.relu(x)
        x = nn.Dense(84)(x)
        x = nn.relu(x)
        x = nn.Dense(self.action_dim)(x)
        return x


class TrainState(TrainState):
    target_params: flax.core.FrozenDict


def linear_schedule(start_e: float, end_e: float, duration: int, t: int):
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


class ReplayBuffer:
    """A fixed-size ring of transitions in NumPy arrays (CleanRL uses stable-baselines3's)."""

    def __init__(self, buffer_size, obs_shape, rng):
        self.observations = np.zeros((buffer_size, *obs_shape), np.float32)
        self.next_observations = np.zeros((buffer_size, *obs_shape), np.float32)
        self.actions = np.zeros(buffer_size, np.int32)
        self.rewards = np.zeros(buffer_size, np.float32)
        self.dones = np.zeros(buffer_size, np.float32)
        self.buffer_size, self.pos, self.full, self.rng = buffer_size, 0, False, rng

    def add(self, obs, next_obs, action, reward, done):
        self.observations[self.pos] = obs
        self.next_observations[self.pos] = next_obs
        self.actions[self.pos] = action
        self.rewards[self.pos] = reward
        self.dones[self.pos] = done
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full, self.pos = True, 0

    def size(self):
        return self.buffer_size if self.full else self.pos

    def sample(self, batch_size):
        idx = self.rng.integers(0, self.size(), size=batch_size)
        return (self.observations[idx], self.actions[idx], self.next_observations[idx],
                self.rewards[idx], self.dones[idx])


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    key, q_key = jax.random.split(key, 2)

    env = gym.wrappers.RecordEpisodeStatistics(gym.make("CartPole-v1"))
    env.action_space.seed(args.seed)
    obs, _ = env.reset(seed=args.seed)

    q_network = QNetwork(action_dim=env.action_space.n)
    q_state = TrainState.create(
        apply_fn=q_network.apply,
        params=q_network.init(q_key, obs),
        target_params=q_network.init(q_key, obs),
        tx=optax.adam(learning_rate=LEARNING_RATE),
    )
    if args.jit:
        q_network.apply = jax.jit(q_network.apply)
    params0 = q_state.params

    rb = ReplayBuffer(BUFFER_SIZE, env.observation_space.shape, rng)

    def update(q_state, observations, actions, next_observations, rewards, dones):
        q_next_target = q_network.apply(q_state.target_params, next_observations)  # (batch_size, num_actions)
        q_next_target = jnp.max(q_next_target, axis=-1)  # (batch_size,)
        next_q_value = rewards + (1 - dones) * GAMMA * q_next_target

        def mse_loss(params):
            q_pred = q_network.apply(params, observations)  # (batch_size, num_actions)
            q_pred = q_pred[jnp.arange(q_pred.shape[0]), actions]  # (batch_size,)
            return ((q_pred - next_q_value) ** 2).mean(), q_pred

        (loss_value, q_pred), grads = jax.value_and_grad(mse_loss, has_aux=True)(q_state.params)
        q_state = q_state.apply_gradients(grads=grads)
        return loss_value, q_pred, q_state

    if args.jit:
        update = jax.jit(update)

    episodic_returns, losses, times = [], [], []
    duration = max(1, args.steps // 2)
    for global_step in range(args.steps):
        t0 = time.perf_counter()
        epsilon = linear_schedule(START_E, END_E, duration, global_step)
        if rng.random() < epsilon:
            action = env.action_space.sample()
        else:
            q_values = q_network.apply(q_state.params, obs)
            action = int(q_values.argmax())

        next_obs, reward, terminated, truncated, info = env.step(action)

        if "episode" in info:
            print(f"global_step={global_step}, episodic_return={info['episode']['r']}")
            episodic_returns.append(float(info["episode"]["r"]))

        rb.add(obs, next_obs, action, reward, terminated)

        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()

        if global_step > LEARNING_STARTS:
            if global_step % TRAIN_FREQUENCY == 0:
                data = rb.sample(BATCH)
                loss, old_val, q_state = update(q_state, *data)
                if global_step % LOG_EVERY == 0:
                    losses.append(float(loss))
                    print(f"global_step={global_step}, td_loss={losses[-1]:.4f}, "
                          f"q_values={jax.device_get(old_val).mean():.4f}")

            if global_step % TARGET_NETWORK_FREQUENCY == 0:
                q_state = q_state.replace(
                    target_params=optax.incremental_update(q_state.params, q_state.target_params, TAU))
        times.append(time.perf_counter() - t0)
    env.close()

    report(times, checksum(param_change(q_state.params, params0), episodic_returns, losses))


if __name__ == "__main__":
    main()
