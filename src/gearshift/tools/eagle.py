"""`gearshift distill --head eagle`: train an EAGLE draft head (`drafters/eagle.py`) for a target.

Three resumable stages, under the output directory:

1. `data.pt`: the target's greedy answers to the training prompts (`distill`'s data path: GSM8K
   questions and, with --self-prompts, requests the target writes itself);
2. `features.pt`: the target's features (last-block outputs, the rows the model runner hands the
   drafter at decoding time) at every position of every prompt + answer, computed by the served
   model itself (its quantized weights), so the head learns on exactly what it will read;
3. `checkpoint.pt`: the head under training (`distill.train`: AdamW, warm-up, cosine decay).

The head starts from the target's last block (float weights from the checkpoint) and learns, at
every answer position, to turn [feature i ; embedding of token i+1] into the feature at i+1:
the loss is the cross-entropy of the target's next-token distribution (its final norm and LM
head applied to the true feature, on the trimmed vocabulary) under the head's, plus a small
regression of the normalised feature itself (EAGLE's two losses). The trimmed vocabulary is the
`vocab` most frequent tokens of the target's answers (FR-Spec), end-of-sequence tokens included.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import attention
from ..drafters.eagle import EagleHead, make_trainable, save_head
from ..hub import atomic_file
from ..loading import read_checkpoint
from .distill import DistillConfig, generate_data, student_from_target, train, training_prompts


def extract_features(llm, data: list[dict], out: Path, save_every: int = 64) -> list[torch.Tensor]:
    """Per item, the served target's features [len(ids), dim] (float16), resumable."""
    path = out / "features.pt"
    feats: list[torch.Tensor] = torch.load(path) if path.exists() else []
    model = llm.model
    cache = model.new_cache(1, max(len(x["ids"]) for x in data) + 1)
    bar = tqdm(total=len(data), initial=len(feats), desc="target features", unit="answer")
    with torch.inference_mode():
        for i in range(len(feats), len(data)):
            cache.reset(0)
            ids = data[i]["ids"].tolist()
            feats.append(model.run(ids, cache, logits_from=0, hidden=True).half())
            bar.update(1)
            if (i + 1) % save_every == 0 or i + 1 == len(data):
                with atomic_file(path) as f:
                    torch.save(feats, f)
    bar.close()
    return feats


def trimmed_vocab(data: list[dict], size: int, eos_ids: set[int], vocab_size: int) -> torch.Tensor:
    """The `size` most frequent tokens of the target's answers (and its end-of-sequence tokens)."""
    counts = Counter()
    for x in data:
        counts.update(x["ids"][x["start"] :].tolist())
    keep = [t for t in eos_ids if t < vocab_size]
    keep += [t for t, _ in counts.most_common() if t not in keep][: max(0, size - len(keep))]
    if len(keep) < size:  # few answers: fill with the lowest ids not yet in (never scored much anyway)
        have = set(keep)
        keep += [t for t in range(vocab_size) if t not in have][: size - len(keep)]
    return torch.tensor(sorted(keep))


def eagle_loss(head: EagleHead, target_norm, embed: torch.Tensor, batch: list[dict], reg: float = 0.1):
    """The head's loss over a batch (teacher-forced: every pair reads the target's true feature)."""
    b, s = len(batch), max(len(x["ids"]) for x in batch) - 1
    dim = head.cfg.dim
    feats = torch.zeros(b, s, dim)
    nxt = torch.zeros(b, s, dim)
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for r, x in enumerate(batch):
        n = len(x["ids"]) - 1
        f = x["feats"].float()
        feats[r, :n], nxt[r, :n] = f[:n], f[1 : n + 1]
        ids[r, :n] = x["ids"][1 : n + 1].long()
        mask[r, max(0, x["start"] - 2) : n] = True  # pairs whose next feature predicts an answer token
    pos = torch.arange(s).repeat(b)
    h = head.step(feats.view(-1, dim), embed[ids.view(-1)], pos, partial(attention.causal, b=b, s=s))  # [b*s, dim]
    m = mask.view(-1)
    h, true = h[m], nxt.view(-1, dim)[m]
    with torch.no_grad():
        p = F.linear(target_norm(true), head.lm_head).float().softmax(-1)
    logq = F.log_softmax(head.logits(h), dim=-1)
    ce = -(p * logq).sum(-1).mean()
    reg_loss = F.smooth_l1_loss(F.rms_norm(h, (dim,)), F.rms_norm(true, (dim,)))
    return ce + reg * reg_loss


def train_eagle(llm, cfg: DistillConfig, vocab_size: int = 8192) -> dict:
    """All three stages and the export; returns a summary (also written to summary.json)."""
    import json

    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = generate_data(llm, cfg, training_prompts(llm, cfg))
    gen_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    feats = extract_features(llm, data, cfg.out)
    feat_s = time.perf_counter() - t1
    for x, f in zip(data, feats):
        x["feats"] = f
    model = llm.model
    vocab = trimmed_vocab(data, vocab_size, llm.eos_ids, model.cfg.vocab_size)
    head = EagleHead(model, vocab)
    ck = read_checkpoint(llm.loaded.path)
    last = student_from_target(ck, [model.cfg.n_layers - 1]).layers[0]  # the target's last block, float
    head.block.load_state_dict({k: v.detach() for k, v in last.state_dict().items()}, strict=False)
    with torch.no_grad():
        head.norm.weight.copy_(model.norm.weight.float())
    head = make_trainable(head).to(model.device)
    for p in [head.vocab, head.lm_head]:
        p.requires_grad_(False)
    embed = model.embed_rows(torch.arange(model.cfg.vocab_size, device=model.device)).float()
    torch.manual_seed(cfg.seed)
    t2 = time.perf_counter()
    summary = train(head, lambda b: eagle_loss(head, model.norm, embed, b), data, cfg)
    head.eval()
    summary.update(
        kind="eagle head",
        vocab=int(vocab.numel()),
        answers=len(data),
        tokens=sum(len(x["ids"]) - x["start"] for x in data),
        generate_s=gen_s,
        features_s=feat_s,
        train_s=time.perf_counter() - t2,
    )
    save_head(head, llm.loaded.path, cfg.out, {"summary": summary})
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
