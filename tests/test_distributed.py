"""Beyond one device (docs/distributed.md): sharded arrays on simulated CPU devices and two
processes on JAX's distributed runtime co-execute with eager's results and shardings.

Each test runs its programs in subprocesses: the device count must be set before JAX starts
(``XLA_FLAGS``), and a deadlock must fail the test, not hang the suite, so every subprocess
has a timeout.  Two devices at most: XLA:CPU collectives need a thread per device, and CI
machines have two cores."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SUPPORT = os.path.join(os.path.dirname(__file__), "support")
TWO_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def results(args, env, timeout):
    """The JSON lines a support script prints (its stderr shown if it fails)."""
    try:
        done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args} did not finish in {timeout} s (a deadlock?):\n{e.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sharded_runs():
    runs = results([os.path.join(SUPPORT, "sharded_programs.py")], TWO_DEVICES, timeout=300)
    return {r["case"]: r for r in runs}


@pytest.mark.parametrize("case", ["data_parallel", "tensor_parallel", "shard_map_psum",
                                  "pmap_psum", "device_get", "sharding_changes",
                                  "fed_sharding_changes", "explicit_sharding_changes"])
def test_sharded_program_matches_eager(sharded_runs, case):
    r = sharded_runs[case]
    assert r["same_values"], r
    # The same placement (jax.jit may write P('model') where eager wrote P('model', None)),
    # of what the program returns and of what it read inside its loop (`x.sharding`).
    assert r["same_shardings"] and r["same_seen"], r
    s = r["stats"]
    assert s["iterations_coexecuted"] >= 9 and s["eager_fallbacks"] == 0, s


def test_sharding_change_is_guarded(sharded_runs):
    """The batch placed sharded, then replicated, then sharded again: `device_put`'s
    sharding is a static argument, so its change leaves the path once (a new path) and the
    return to the first placement finds the first path again."""
    r = sharded_runs["sharding_changes"]
    assert r["seen"] == r["want_seen"] and len(set(r["seen"])) == 2, r
    assert r["stats"]["divergences"] <= 3, r


def test_fed_sharding_change_is_a_guard_with_explicit_sharding(sharded_runs):
    """Arrays placed before the loop, fed with another sharding from step 4 on: with
    explicit sharding the aval carries it, so the feed's guard fails as for a new shape (a
    new path); in auto mode the recorded graph does not depend on it and jax.jit compiles
    the segment for the new placement.  Both give eager's placements step by step."""
    auto, explicit = sharded_runs["fed_sharding_changes"], sharded_runs["explicit_sharding_changes"]
    assert len(set(auto["seen"])) == 2 and len(set(explicit["seen"])) == 2
    assert explicit["stats"]["divergences"] > auto["stats"]["divergences"], (auto, explicit)


def test_unfetched_loop_does_not_deadlock():
    """A data-parallel loop that fetches nothing launches one step per turn ahead of the
    devices; unpaced, the 33rd multi-device computation in flight hung XLA:CPU."""
    (r,) = results([os.path.join(SUPPORT, "sharded_programs.py"), "unfetched_steps"],
                   TWO_DEVICES, timeout=120)
    assert r["same_values"], r
    assert r["stats"]["iterations_coexecuted"] >= 100 and r["stats"]["eager_fallbacks"] == 0, r


# ------------------------------------------------------------------ two processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(mode, terra, timeout=120):
    """Both processes' RESULT lines; both are killed if either does not finish in time."""
    port = free_port()
    script = os.path.join(SUPPORT, "two_process_dp.py")
    env = dict(os.environ, XLA_FLAGS="")
    env.pop("XLA_FLAGS")
    cmd = [sys.executable] + (["-m", "terra_bc"] if terra else [])
    procs = [subprocess.Popen(cmd + [script, str(port), str(pid), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(next(line for line in out.splitlines()
                                        if line.startswith("RESULT "))[7:]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"two processes ({mode}) did not finish in {timeout} s (a deadlock?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.fixture(scope="module")
def eager_two_processes():
    return two_processes("same", terra=False)


def assert_same_training(got, want):
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, atol=1e-6)
    for g, w in zip(got["params"], want["params"]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["same", "fetch", "diverge"])
def test_two_processes_match_eager(eager_two_processes, mode):
    """A data-parallel loop over two processes under `python -m terra_bc`: both processes
    get eager's losses and parameters and co-execute, also where one process alone takes a
    new path (extra ops) or cuts its segments elsewhere (a fetch between collectives)."""
    got = two_processes(mode, terra=True)
    for g, w in zip(got, eager_two_processes):
        assert_same_training(g, w)
        s = g["stats"]
        assert s["iterations_coexecuted"] >= 10 and s["eager_fallbacks"] == 0, s
    if mode != "same":  # process 0 left its path; process 1 did not
        assert got[0]["stats"]["divergences"] > got[1]["stats"]["divergences"], got
