"""`gearshift distill`: train a small draft model for a target, FastDraft-style.

The draft starts as a subset of the target's own blocks (the first L, or every k-th), shares
the target's tokenizer, embeddings and LM head (frozen, and not stored again: the draft's
config points at its target), and learns by distillation: its next-token distribution is pulled
towards the target's (top-k soft targets) on text the target itself generated for training
prompts. Text the target wrote is what a draft has to predict at decoding time, and the
target's logits for it come for free while generating.

Two stages, both resumable: `data.pt` (the target's answers with its top-k logits, written
batch by batch) and `checkpoint.pt` (student, optimizer and step, every `save_every` steps).
The result is a Hugging Face style directory that `--drafter model:PATH` loads.

`--self-prompts N` adds N requests the target writes itself (Magpie): GSM8K alone makes a draft
that is good at arithmetic word problems and little else. `--task-prompts N` adds N more whose
user turn the target continues after a task opener (translate, summarize, answer from a passage,
...: `TASK_OPENERS`), so it writes the passage itself: the requests people send with text to work
on, which free-form self-prompts almost never are.

`--early-exit` trains, on the same data, only an exit head (norm + low-rank adapter) on the
target's first L blocks, the SortedNet / Kangaroo way: `--drafter early-exit:DIR` then drafts
with the target's own blocks and that head, at the cost of a few thousand weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import GearshiftError
from ..hub import atomic_file
from ..loading import Checkpoint, _unpermute, build_model, read_checkpoint
from ..model import ExitHead, Transformer
from .data import read_jsonl

SHARED = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class DistillConfig:
    out: Path
    layers: list[int]  # which of the target's blocks the draft starts from
    prompts: list[str]
    self_prompts: int = 0  # requests the target writes itself, added to `prompts`
    task_prompts: int = 0  # requests with a task opener and a passage the target writes, added after those
    max_new_tokens: int = 128
    gen_batch: int = 16
    top_k: int = 32  # soft targets kept per position
    batch_tokens: int = 2048
    steps: int = 400
    minutes: float | None = None  # stop training after this long (the checkpoint stays resumable)
    lr: float = 1e-3
    save_every: int = 50
    seed: int = 0


def pick_layers(n_layers: int, first: int | None, every: int | None) -> list[int]:
    if (first is None) == (every is None):
        raise GearshiftError("choose the draft's blocks with exactly one of --layers L (the first L) or --every K")
    if first is not None:
        if not 1 <= first < n_layers:
            raise GearshiftError(f"--layers must be between 1 and {n_layers - 1}")
        return list(range(first))
    if not 2 <= every <= n_layers:
        raise GearshiftError(f"--every must be between 2 and {n_layers}")
    return list(range(0, n_layers, every))


def gsm8k_prompts(path: Path, first: int, count: int) -> list[str]:
    """Questions `first` .. `first + count` of a GSM8K-style JSONL file (training text only)."""
    try:
        rows = read_jsonl(path)
    except GearshiftError as e:
        raise GearshiftError(f"cannot read training prompts: {e}") from None
    return [r["question"] for r in rows[first : first + count]]


# Openers of the task prompts: what people ask a chat model to do with a text they paste in.
TASK_OPENERS = (
    "Translate the following German text into English:\n\n",
    "Translate the following text into French:\n\n",
    "Summarize the following article in a few sentences:\n\n",
    "Read the passage below and answer the question that follows it.\n\n",
    "Rewrite the following paragraph in simpler words:\n\n",
    "List the people, places and dates mentioned in this text:\n\n",
)


def self_prompts(
    llm, n: int, seed: int = 0, max_tokens: int = 64, batch: int = 32, opener: str = "", desc: str = "prompts"
) -> list[str]:
    """`n` distinct user requests sampled from the chat template's open user turn (Magpie, Xu et
    al. 2024): an instruction-tuned model continuing there writes the kind of request it was tuned
    on, so a general-purpose draft needs no other text, and no benchmark prompt is ever seen.
    Requests cut off by `max_tokens` are dropped. Each round asks for `batch` samples of the open
    turn (`n` = batch: sample j is seeded with the round's seed + j). With an `opener`, the turn
    starts with it and the target writes the text it is about (kept even where `max_tokens` cuts
    it: the opener is the request)."""
    sentinel = "\x00"
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], add_generation_prompt=False)
    prefix = llm.tokenizer.encode(text[: text.index(sentinel)] + opener, add_special_tokens=False)
    out: list[str] = []
    bar = tqdm(total=n, desc=f"target writes training {desc}", unit="prompt")
    for i in range(max(1, 10 * n // batch)):
        for c in llm.generate(
            prefix, n=min(batch, 2 * n), temperature=1.0, top_p=0.95, seed=seed + i * batch, max_tokens=max_tokens
        ):
            q = c.text.strip()
            if (c.finish_reason == "stop" or opener) and len(q) >= 16 and q not in out and len(out) < n:
                out.append(q)
                bar.update(1)
        if len(out) == n:
            break
    bar.close()
    out = [opener + q for q in out]
    if len(out) < n:
        tqdm.write(f"gearshift: the target wrote only {len(out)} usable requests of the {n} asked for")
    return out


# ---------------------------------------------------------------- stage 1: the target writes the data


def training_prompts(llm, cfg: DistillConfig) -> list[str]:
    """The configured prompts, then the `self_prompts` the target writes itself, then the task
    prompts. Those are kept beside the data (written whole or not at all, like the data and the
    checkpoint), so a resumed run sees the same prompts in the same order, and a run that adds
    task prompts to an earlier one's data only generates answers for the new ones."""
    prompts = list(cfg.prompts)
    if cfg.self_prompts:
        path = cfg.out / "self_prompts.json"
        if not path.exists():
            with atomic_file(path) as f:
                f.write(json.dumps(self_prompts(llm, cfg.self_prompts, cfg.seed), indent=0).encode())
        prompts += json.loads(path.read_text())
    if cfg.task_prompts:
        path = cfg.out / "task_prompts.json"
        if not path.exists():
            per = -(-cfg.task_prompts // len(TASK_OPENERS))
            tasks = [
                self_prompts(llm, per, cfg.seed + 7919 * (i + 1), 160, opener=o, desc=f"task texts {i + 1}")
                for i, o in enumerate(TASK_OPENERS)
            ]
            mixed = [t[j] for j in range(per) for t in tasks if j < len(t)][: cfg.task_prompts]  # interleaved
            with atomic_file(path) as f:
                f.write(json.dumps(mixed, indent=0).encode())
        prompts += json.loads(path.read_text())
    return prompts


def generate_data(llm, cfg: DistillConfig, prompts: list[str]) -> list[dict]:
    """Greedy answers by the target through the public API, batch by batch, with its top-k
    log-probabilities at every answer position (the soft targets: their softmax is the target's
    top-k distribution)."""
    path = cfg.out / "data.pt"
    data: list[dict] = torch.load(path) if path.exists() else []
    todo = prompts[len(data) :]
    chat = bool(llm.tokenizer.chat_template)
    top_k = min(cfg.top_k, llm.model.cfg.vocab_size)
    bar = tqdm(total=len(prompts), initial=len(data), desc="target writes training text", unit="answer")
    for b in range(0, len(todo), cfg.gen_batch):
        batch = [[{"role": "user", "content": q}] if chat else q for q in todo[b : b + cfg.gen_batch]]
        for prompt, c in zip(batch, llm.generate(batch, max_tokens=cfg.max_new_tokens, logprobs=top_k)):
            ids = llm.encode(prompt)
            tops = [lp.top_logprobs for lp in c.logprobs]
            data.append(
                {
                    "ids": torch.tensor(ids + c.token_ids, dtype=torch.int32),
                    "start": len(ids),
                    "top_values": torch.tensor([[t.logprob for t in row] for row in tops]).reshape(-1, top_k).half(),
                    "top_indices": torch.tensor([[t.id for t in row] for row in tops], dtype=torch.int32).reshape(
                        -1, top_k
                    ),
                }
            )
        with atomic_file(path) as f:
            torch.save(data, f)
        bar.update(len(batch))
    bar.close()
    return data


# ---------------------------------------------------------------- stage 2: the draft learns


def student_from_target(ck: Checkpoint, layers: list[int]) -> Transformer:
    """The chosen blocks, renumbered, as a float32 model whose block weights (and final norm) train."""
    t = {k: v for k, v in ck.tensors.items() if ".layers." not in k}
    for new, old in enumerate(layers):
        prefix = f"model.layers.{old}."
        t.update({f"model.layers.{new}." + k[len(prefix) :]: v for k, v in ck.tensors.items() if k.startswith(prefix)})
    types, nope = ck.config.layer_types, ck.config.no_rope
    cfg = ck.config.__class__(
        **{
            **ck.config.to_dict(),
            "n_layers": len(layers),
            "layer_types": types and [types[i] for i in layers],  # each block keeps its kind
            "no_rope": nope and [new for new, old in enumerate(layers) if old in nope],
        }
    )
    model = build_model(
        Checkpoint(cfg, t, ck.bits, ck.tokenizer_dir, ck.quantization),
        {"layers": "float32", "lm_head": "float32"},
        torch.float32,
    )
    model.init_rope()
    for module in [*model.layers.modules(), model.norm]:
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point():
                setattr(module, name, torch.nn.Parameter(buf.clone()))
    return model


def _tokens(batch: list[dict]) -> torch.Tensor:
    length = max(len(x["ids"]) for x in batch)
    tokens = torch.zeros(len(batch), length, dtype=torch.long)
    for r, x in enumerate(batch):
        tokens[r, : len(x["ids"])] = x["ids"].long()
    return tokens


def _answer_rows(h: torch.Tensor, batch: list[dict]) -> torch.Tensor:
    """The hidden states that predict each answer token: [answer tokens in the batch, dim]."""
    return torch.cat([h[r, x["start"] - 1 : x["start"] - 1 + len(x["top_indices"])] for r, x in enumerate(batch)])


def soft_cross_entropy(logits: torch.Tensor, batch: list[dict]) -> torch.Tensor:
    """Cross-entropy against the target's top-k distribution (the KL up to a constant)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    target = F.softmax(torch.cat([x["top_values"].float() for x in batch]), dim=-1)
    picked = logp.gather(1, torch.cat([x["top_indices"] for x in batch]).long())
    return -(target * picked).sum(-1).mean()


def distill_loss(model: Transformer, batch: list[dict]) -> torch.Tensor:
    """The draft's loss at every answer position."""
    rows = _answer_rows(model.forward_train(_tokens(batch)), batch)
    return soft_cross_entropy(model.lm_head(model.norm(rows)), batch)


def exit_loss(
    target: Transformer, n_layers: int, head: ExitHead, lm_head: torch.Tensor, batch: list[dict]
) -> torch.Tensor:
    """An exit head's loss: the target's own first blocks (frozen), then the head and the LM head."""
    with torch.no_grad():
        rows = _answer_rows(target.forward_train(_tokens(batch), n_layers=n_layers), batch)
    return soft_cross_entropy(F.linear(head(rows), lm_head), batch)


def _batches(data: list[dict], batch_tokens: int, rng: random.Random):
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        batch, size = [], 0
        for i in order:
            batch.append(data[i])
            size += len(data[i]["ids"])
            if size >= batch_tokens:
                yield batch
                batch, size = [], 0


def train(student: torch.nn.Module, loss_fn, data: list[dict], cfg: DistillConfig) -> dict:
    """AdamW with warm-up and cosine decay on `student`'s parameters; `loss_fn(batch)` is the loss."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    ckpt = cfg.out / "checkpoint.pt"
    step, history = 0, []
    if ckpt.exists():  # resume where the last run stopped
        state = torch.load(ckpt, weights_only=False)
        student.load_state_dict(state["student"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history = state["step"], state["history"]
    rng = random.Random(cfg.seed + step)
    batches = _batches(data, cfg.batch_tokens, rng)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="distilling", unit="step")
    device = next(student.parameters()).device
    while step < cfg.steps:
        with torch.autocast(device.type, dtype=torch.bfloat16):  # AMX / tensor cores; the weights stay float32
            loss = loss_fn(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.3f}")
        bar.update(1)
        out_of_time = cfg.minutes is not None and time.perf_counter() - t0 > 60 * cfg.minutes
        if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
            trainable = {k: v for k, v in student.state_dict().items() if k in dict(student.named_parameters())}
            with atomic_file(ckpt) as f:
                torch.save(
                    {
                        "student": trainable,
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "step": step,
                        "history": history,
                    },
                    f,
                )
        if out_of_time:
            break
    bar.close()
    return {"steps": step, "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None}


# ---------------------------------------------------------------- the draft directory


def export(student: Transformer, target: Checkpoint, target_path: Path, tokenizer, out: Path) -> None:
    """Write the draft's own weights in Hugging Face names; embeddings and LM head stay in the target."""
    cfg = student.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    t = {"model.norm.weight": student.norm.weight}
    for i, layer in enumerate(student.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = layer.qkv.weight.split([q, kv, kv])
        gate, up = layer.gate_up.weight.chunk(2)
        t.update(
            {
                p + "self_attn.q_proj.weight": _unpermute(wq, cfg.n_heads),
                p + "self_attn.k_proj.weight": _unpermute(wk, cfg.n_kv_heads),
                p + "self_attn.v_proj.weight": wv,
                p + "self_attn.o_proj.weight": layer.o.weight,
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.down.weight,
                p + "input_layernorm.weight": layer.attn_norm.weight,
                p + "post_attention_layernorm.weight": layer.mlp_norm.weight,
            }
        )
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    shared = [n for n in SHARED if n in target.tensors]
    (out / "config.json").write_text(
        json.dumps(
            {
                "model_type": cfg.arch,
                "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.dim,
                "intermediate_size": cfg.hidden_dim,
                "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_kv_heads,
                "head_dim": cfg.head_dim,
                "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_scaling": cfg.rope_scaling,
                "max_position_embeddings": cfg.max_seq_len,
                "tie_word_embeddings": "lm_head.weight" not in shared,
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_ids,
                "gearshift_shared": {"base": str(target_path.resolve()), "tensors": shared},
            },
            indent=1,
        )
    )
    tokenizer.save(out)


def export_exit(head: ExitHead, n_layers: int, target_path: Path, out: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / "exit.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {"gearshift_exit": {"base": str(target_path.resolve()), "layers": n_layers, "rank": head.a.shape[0]}},
            indent=1,
        )
    )


DRAFT_ARCHS = ("llama", "mistral", "qwen2")  # what `export` writes back faithfully (Llama's layout)


def distill(llm, cfg: DistillConfig, early_exit: bool = False, rank: int = 32) -> dict:
    """Both stages and the export; returns a summary (also written to summary.json).

    `early_exit` trains an exit head on the target's first `len(cfg.layers)` blocks instead of
    a separate draft: the blocks stay the target's own, only the head is stored.
    """
    arch = llm.model.cfg.arch
    if not early_exit and arch not in DRAFT_ARCHS:  # before any work: `export` writes Llama's layout
        raise GearshiftError(
            f"distilling a draft model supports {', '.join(DRAFT_ARCHS)} targets, not {arch} "
            "(its QK-norm, extra norms or per-layer RoPE would not be exported); --early-exit works"
        )
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = generate_data(llm, cfg, training_prompts(llm, cfg))
    gen_s = time.perf_counter() - t0
    target = read_checkpoint(llm.loaded.path)
    torch.manual_seed(cfg.seed)
    t1 = time.perf_counter()
    if early_exit:
        if cfg.layers != list(range(len(cfg.layers))):
            raise GearshiftError("an early-exit head sits on the target's first L blocks: use --layers L")
        head = ExitHead(llm.model.cfg.dim, llm.model.cfg.norm_eps, rank).to(llm.device)
        with torch.no_grad():
            head.norm.weight.copy_(target.tensors["model.norm.weight"])
        lm_head = target.tensors.get("lm_head.weight", target.tensors["model.embed_tokens.weight"]).to(llm.device)
        summary = train(head, lambda b: exit_loss(llm.model, len(cfg.layers), head, lm_head, b), data, cfg)
        export_exit(head, len(cfg.layers), llm.loaded.path, cfg.out)
    else:
        student = student_from_target(target, cfg.layers).to(llm.device)
        summary = train(student, lambda b: distill_loss(student, b), data, cfg)
        export(student, target, llm.loaded.path, llm.tokenizer, cfg.out)
    summary.update(
        kind="early-exit head" if early_exit else "draft",
        layers=cfg.layers,
        answers=len(data),
        tokens=sum(len(x["top_indices"]) for x in data),
        generate_s=gen_s,
        train_s=time.perf_counter() - t1,
    )
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
