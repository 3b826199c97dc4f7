"""The replica router's policy (`server/routing.py`) in plain Python, and the CLI's refusals for
`gearshift serve --replicas`; nothing here needs Ray (`test_cluster.py` runs the real thing)."""

import builtins
import random

import pytest

from gearshift.cli import main
from gearshift.server.routing import PrefixTree, Router, RoutingConfig


def test_tree_finds_the_longest_prefix_and_who_holds_it():
    t = PrefixTree(10_000)
    t.insert([1, 2, 3, 4, 5], "a")
    t.insert([1, 2, 3, 9], "b")  # splits the edge after 1, 2, 3
    t.insert([7, 8], "b")
    assert t.match([1, 2, 3, 4, 5, 6], ["a", "b"]) == (5, {"a"})
    assert t.match([1, 2, 3, 9, 9], ["a", "b"]) == (4, {"b"})
    assert t.match([1, 2, 3], ["a", "b"]) == (3, {"a", "b"})
    assert t.match([1, 2, 3, 4], ["b"]) == (3, {"b"})  # only the replicas Serve offers count
    assert t.match([5], ["a", "b"]) == (0, set())
    assert t.size == 5 + 4 + 2 and t.held == {"a": 5, "b": 6}


def test_tree_stays_bounded_and_keeps_what_was_used_last():
    rng = random.Random(0)
    t = PrefixTree(2_000)
    for step in range(400):
        t.insert([rng.randrange(50) for _ in range(40)], rng.choice("abc"), now=float(step))
        assert t.size <= 2_000
    assert sum(t.held.values()) == t.size
    last = [3] * 60
    t.insert(last, "a", now=1e9)
    assert t.match(last, "abc") == (60, {"a"})
    for _ in range(100):  # newer entries push the old ones out, and the newest stay
        t.insert([rng.randrange(50) for _ in range(40)], "b", now=2e9)
    assert t.match(last, "abc")[0] < 60


def test_a_lost_replica_takes_its_entries_with_it():
    r = Router(RoutingConfig())
    r.routed([1, 2, 3, 4], "a")
    r.routed([1, 2, 3, 4], "b")
    r.forget("a")
    assert r.tree.match([1, 2, 3, 4], "ab") == (4, {"b"})
    r.retain(["c"])  # Serve's replica set no longer has b either
    assert r.tree.size == 0 and r.tree.match([1, 2, 3, 4], "abc") == (0, set())


def test_cache_aware_sends_a_conversation_back_to_its_replica():
    r = Router(RoutingConfig(cache_threshold=0.5, balance_abs_threshold=4))
    turn1 = list(range(100))
    d = r.choose(turn1, {"a": 0, "b": 0})
    assert d.reason == "load"
    r.routed(turn1, d.order[0], d.reason)
    r.learn(turn1 + list(range(1000, 1050)), d.order[0])  # the answer is in that replica's slot too
    turn2 = turn1 + list(range(1000, 1050)) + list(range(2000, 2040))
    d2 = r.choose(turn2, {"a": 1, "b": 0})  # slightly busier, but it holds 150 of 190 tokens
    assert (d2.reason, d2.order[0], d2.matched) == ("cache", d.order[0], 150)
    other = r.choose(list(range(5000, 5100)), {d.order[0]: 1, d2.order[1]: 1})
    assert other.reason == "load" and other.order[0] != d.order[0]  # a new prompt: the one holding less
    small = r.choose(turn1[:10] + list(range(7000, 7100)), {"a": 0, "b": 0})
    assert small.reason == "load"  # 10 of 110 tokens matched: below the threshold


def test_balance_thresholds_override_the_cache():
    r = Router(RoutingConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    prompt = list(range(64))
    r.routed(prompt, "a")
    assert r.choose(prompt, {"a": 4, "b": 0}).order[0] == "a"  # a difference of 4 is not > 4
    d = r.choose(prompt, {"a": 9, "b": 3})
    assert (d.reason, d.order) == ("balance", ["b", "a"])
    assert r.choose(prompt, {"a": 20, "b": 15}).reason == "cache"  # 20 < 15 * 1.5: relative load is fine


def test_round_robin_cycles_and_ignores_the_cache():
    r = Router(RoutingConfig(policy="round-robin"))
    prompt = list(range(64))
    firsts = []
    for _ in range(4):
        d = r.choose(prompt, {"b": 0, "a": 5})
        r.routed(prompt, d.order[0], d.reason)
        firsts.append(d.order[0])
    assert firsts == ["a", "b", "a", "b"] and r.tree.size == 0 and r.decisions == {"round-robin": 4}


@pytest.mark.parametrize(
    "bad", [dict(policy="random"), dict(cache_threshold=1.5), dict(balance_rel_threshold=0.5), dict(max_tree_tokens=0)]
)
def test_bad_routing_settings_are_refused(bad):
    from gearshift.errors import GearshiftError

    with pytest.raises(GearshiftError):
        RoutingConfig(**bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--routing", "round-robin"], "--routing needs --replicas"),
        (["--ray-address", "auto"], "--ray-address needs --replicas"),
        (["--replicas", "2", "--cache-threshold", "2"], "cache_threshold must be from 0 to 1"),
    ],
)
def test_cluster_flags_fail_with_one_line(argv, message, capsys):
    assert main(["serve", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_replicas_without_ray_say_how_to_get_it(monkeypatch, capsys):
    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["serve", "--replicas", "2"]) == 1
    assert "pip install 'gearshift[cluster]'" in capsys.readouterr().err
