"""DQN on gymnasium's CartPole-v1, the way a JAX user typically writes it.

The Q-network is a small MLP whose parameters are a plain pytree (a list of ``{"w", "b"}``
dicts); the replay buffer is a ring of NumPy arrays. Each episode is a ``while not done:``
loop over environment steps: the agent acts epsilon-greedily, taking
``int(jnp.argmax(q_values(params, obs)))`` at every step (replaced by a random action with
probability epsilon), steps the environment on the host, stores the transition and, once
the buffer holds a few transitions, makes one optax (Adam) update on a Huber TD loss against a target
network that is copied from the online one every few updates; the loss is fetched with
``float()`` every update. ``--steps N`` is the total number of environment steps (the last
episode is cut short when the budget runs out); one per-step time per environment step.
Updates start once the buffer holds 8 transitions (batches of 32 are sampled with
replacement), so a quick run (10 steps) already trains. All randomness
comes from --seed: NumPy's generator (epsilon, random actions, buffer sampling),
``env.reset(seed=seed)`` on the first reset, ``jax.random.PRNGKey(seed)`` for the
initialisation. ``--jit`` is ``jax.jit`` of the update (and of the acting Q-function).

    python examples/lib_dqn_cartpole.py --steps 30 [--jit] [--seed 0]
"""
import time

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import checksum, param_change, parse_args, report

HIDDEN = (64, 64)
BATCH, BUFFER_SIZE, GAMMA, LR = 32, 10_000, 0.99, 1e-3
LEARNING_STARTS = 8  # transitions in the buffer before the first update
TARGET_EVERY = 5  # updates between copies of the online network into the target network
EPS_START, EPS_END, EPS_DECAY_STEPS = 1.0, 0.05, 500


def init_params(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (n_in, n_out)) * np.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)}
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])]


def q_values(params, obs):
    *hidden, last = params
    x = obs
    for layer in hidden:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


def td_loss(params, target_params, obs, actions, rewards, next_obs, dones):
    q = q_values(params, obs)
    q_taken = jnp.take_along_axis(q, actions[:, None], axis=1)[:, 0]
    next_q = q_values(target_params, next_obs).max(axis=1)
    target = rewards + GAMMA * (1.0 - dones) * next_q
    return optax.huber_loss(q_taken, jax.lax.stop_gradient(target)).mean()


optimizer = optax.adam(LR)


def update(params, target_params, opt_state, batch):
    loss, grads = jax.value_and_grad(td_loss)(params, target_params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


class ReplayBuffer:
    """A fixed-size ring of transitions in NumPy arrays."""

    def __init__(self, capacity, obs_dim):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros(capacity, np.int32)
        self.rewards = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self.capacity, self.pos, self.size = capacity, 0, 0

    def add(self, obs, action, reward, next_obs, done):
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.dones[i] = next_obs, done
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng, batch_size):
        idx = rng.integers(0, self.size, size=batch_size)
        return (self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx],
                self.dones[idx])


def epsilon_at(step):
    frac = min(1.0, step / EPS_DECAY_STEPS)
    return EPS_START + frac * (EPS_END - EPS_START)


def main():
    args = parse_args(__doc__)
    rng = np.random.default_rng(args.seed)
    env = gym.make("CartPole-v1")
    obs_dim, n_actions = env.observation_space.shape[0], env.action_space.n
    params = params0 = init_params(jax.random.PRNGKey(args.seed), (obs_dim, *HIDDEN, n_actions))
    target_params = params
    opt_state = optimizer.init(params)
    update_fn = jax.jit(update) if args.jit else update
    act_fn = jax.jit(q_values) if args.jit else q_values
    buffer = ReplayBuffer(BUFFER_SIZE, obs_dim)

    returns, losses, times = [], [], []
    total_steps, num_updates, episode = 0, 0, 0
    while total_steps < args.steps:
        obs, _ = env.reset(seed=args.seed if episode == 0 else None)
        done, episode_return, first_loss = False, 0.0, len(losses)
        while not done:
            t0 = time.perf_counter()
            action = int(jnp.argmax(act_fn(params, obs)))
            if rng.random() < epsilon_at(total_steps):
                action = int(rng.integers(n_actions))
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs, action, reward, next_obs, float(terminated))
            obs = next_obs
            episode_return += float(reward)
            total_steps += 1

            if buffer.size >= LEARNING_STARTS:
                params, opt_state, loss = update_fn(params, target_params, opt_state,
                                                    buffer.sample(rng, BATCH))
                losses.append(float(loss))
                num_updates += 1
                if num_updates % TARGET_EVERY == 0:
                    target_params = params
            times.append(time.perf_counter() - t0)
            # The step budget ends the last episode early.
            done = terminated or truncated or total_steps >= args.steps
        returns.append(episode_return)
        mean_loss = np.mean(losses[first_loss:]) if len(losses) > first_loss else float("nan")
        print(f"episode {episode:3d}  return {episode_return:5.1f}  steps {total_steps:5d}  "
              f"epsilon {epsilon_at(total_steps):.3f}  loss {mean_loss:.4f}")
        episode += 1
    env.close()

    report(times, checksum(param_change(params, params0), returns, losses))


if __name__ == "__main__":
    main()
