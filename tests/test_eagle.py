"""EAGLE draft heads: the features they read are the target's, drafting is lossless, training runs."""

import pytest
import torch

from gearshift import LLM
from gearshift.drafters.eagle import EagleDrafter, EagleHead
from gearshift.loading import load
from gearshift.strategies import make_drafter
from gearshift.tools.distill import DistillConfig
from gearshift.tools.eagle import train_eagle, trimmed_vocab
from test_speculative import SAMPLING, chi_square, critical_value
from tiny import VOCAB, tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eagle")
    return LLM(load(tiny_model_dir(root / "target", 2, seed=1), weights="int8", device="cpu", use_cache=False))


def random_drafter(target: LLM, vocab=None, **kw) -> EagleDrafter:
    """An untrained head (random fc, the block from nowhere): it drafts badly but really drafts."""
    torch.manual_seed(0)
    head = EagleHead(target.model, torch.arange(VOCAB) if vocab is None else vocab).eval()
    kw = {"max_nodes": 12, "depth": 4, "width": 2, "stop_below": 0.0, **kw}
    return EagleDrafter(head, target.model.embed_rows, "eagle", None, **kw)


class Recording(EagleDrafter):
    """Keeps every feature the model runner hands over, by position."""

    seen: dict[int, torch.Tensor] = {}

    def fork(self):
        d = Recording(self.head, self.embed, self.name, None, self.max_nodes, self.depth, self.width, self.stop_below)
        return d

    def see(self, start, take, features):
        for i in range(take):
            Recording.seen[start + i] = features[i].clone()
        super().see(start, take, features)


def test_the_runner_hands_the_drafter_the_targets_own_features(tiny):
    """Every context position's feature (prompt chunks, verified roots, accepted draft nodes) equals
    the last-block output of one plain forward over the final sequence, bit for bit."""
    prompt = [1, 2, 3, 1, 2, 3, 4, 5, 1, 2]
    d = random_drafter(tiny)
    rec = Recording(d.head, d.embed, "eagle", None, 12, 4, 2, 0.0)
    Recording.seen = {}
    c = tiny.generate(prompt, drafter=rec, max_tokens=24, ignore_eos=True)
    tokens = prompt + c.token_ids
    m = tiny.model
    with torch.inference_mode():
        ref = m.run(tokens, m.new_cache(1, len(tokens) + 1), logits_from=0, hidden=True)
    assert set(range(len(prompt))) <= set(Recording.seen)
    for pos, f in Recording.seen.items():
        assert torch.equal(f, ref[pos]), pos


def test_eagle_greedy_identical_to_plain_side_by_side(tiny):
    """40 random prompts decoded side by side with (untrained) EAGLE trees, a trimmed vocabulary
    and the early stop: each output is the prompt's plain output alone."""
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(40):
        base = torch.randint(0, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        prompts.append(base * int(torch.randint(1, 4, (1,), generator=g)))
    refs = [tiny.generate(p, max_tokens=30, ignore_eos=True).token_ids for p in prompts]
    for kw in ({}, {"vocab": torch.tensor([0, 2, 5, 7])}, {"stop_below": 0.3, "depth": 6}):
        outs = tiny.generate(prompts, drafter=random_drafter(tiny, **kw), max_tokens=30, ignore_eos=True)
        assert [c.token_ids for c in outs] == refs, kw
        assert sum(c.stats.spec.proposed for c in outs) > 0


def test_eagle_sampling_keeps_target_distribution(tiny):
    """Deterministic trees, so a rejected candidate is taken out of p: the pair distribution of the
    first two tokens stays the target's (chi-square, as test_speculative's drafters)."""
    chi2, df = chi_square(tiny, random_drafter(tiny), [1, 2, 3, 1, 2], SAMPLING, n=3000)
    assert chi2 < critical_value(df), (chi2, df)


def test_trimmed_vocabulary_is_the_most_frequent_answer_tokens():
    data = [
        {"ids": torch.tensor([9, 9, 1, 1, 1, 2]), "start": 2},
        {"ids": torch.tensor([9, 3, 2, 1]), "start": 1},
    ]
    assert trimmed_vocab(data, 3, {7}, 10).tolist() == [1, 2, 7]  # EOS always in; 9 only in prompts
    assert trimmed_vocab(data, 5, set(), 10).tolist() == [0, 1, 2, 3, 4]  # filled up from the lowest ids


def test_distill_head_eagle_end_to_end_and_resumable(tiny, tmp_path):
    """The whole recipe on the tiny model: the target writes answers, its features are taken,
    the head trains, is saved and loads as `eagle:DIR`, and drafts losslessly; a second run
    resumes (nothing regenerated, the step count kept)."""
    cfg = DistillConfig(
        out=tmp_path / "head",
        layers=[],
        prompts=["a b c d", "e f g h a b", "c c d d e", "h g f e d c"],
        max_new_tokens=12,
        gen_batch=2,
        steps=6,
        batch_tokens=40,
        save_every=3,
    )
    summary = train_eagle(tiny, cfg, vocab_size=6)
    assert summary["steps"] == 6 and summary["vocab"] == 6 and summary["answers"] == 4
    assert (cfg.out / "eagle.safetensors").exists() and (cfg.out / "features.pt").exists()
    mtime = (cfg.out / "data.pt").stat().st_mtime
    again = train_eagle(tiny, cfg, vocab_size=6)
    assert again["steps"] == 6 and (cfg.out / "data.pt").stat().st_mtime == mtime
    drafter = make_drafter(f"eagle:{cfg.out}", tiny.model, tiny.tokenizer, tiny.loaded.path)
    prompts = [[1, 2, 3, 4, 1, 2], [5, 6, 7, 5, 6]]
    refs = [tiny.generate(p, max_tokens=20, ignore_eos=True).token_ids for p in prompts]
    assert [c.token_ids for c in tiny.generate(prompts, drafter=drafter, max_tokens=20, ignore_eos=True)] == refs


def test_speculative_config_takes_vllms_eagle_shape():
    from gearshift.errors import GearshiftError
    from gearshift.server import parse_speculative_config

    s = parse_speculative_config({"method": "eagle", "model": "/heads/smollm2", "num_speculative_tokens": 8})
    assert (s.drafter, s.k) == ("eagle:/heads/smollm2", 8)
    with pytest.raises(GearshiftError, match="needs"):
        parse_speculative_config({"method": "eagle"})
