"""Gemma-3-270M with its real weights (the second model `gearshift pull` knows): what the GGUF says
about its layers, its chat turns and stop token, its sliding window beyond 512 positions, the
server, and its greedy output beside llama.cpp's on the same file where llama.cpp is built.
(The architecture itself is checked against transformers on tiny random models in
test_architectures.)"""

import json

import httpx
import openai
import pytest
import torch

from gearshift import LLM, load
from gearshift.errors import GearshiftError
from gearshift.server import ServerConfig, create_app
from gearshift.tools import llama_cpp
from gearshift.tools.bench import agreement
from test_server import serving

NAME = "gemma-3-270m"
LLAMA_CPP = llama_cpp.default_dir()  # the user's build, looked up before the session moves $GEARSHIFT_HOME


@pytest.fixture(scope="module")
def gemma(gearshift_home):
    return load(NAME)


def test_the_gguf_gives_gemma_3s_layout(gemma):
    cfg = gemma.model.cfg
    assert cfg.arch == "gemma3" and cfg.n_layers == 18 and cfg.sliding_window == 512
    assert [i for i, w in enumerate(cfg.windows) if w is None] == [5, 11, 17]  # every sixth layer is global
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.tie_embeddings
    end_of_turn = gemma.tokenizer.token_id("<end_of_turn>")
    assert end_of_turn in cfg.eos_token_ids and end_of_turn in gemma.eos_ids


def test_chat_turns_and_the_stop_token(gemma):
    """The base model's GGUF has no template: Gemma's turn format is used, a system message opening
    the first user turn."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    assert gemma.tokenizer.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = gemma.encode(messages)
    assert ids[0] == gemma.tokenizer.token_id("<bos>") and ids.count(ids[0]) == 1
    # (the base model never writes <end_of_turn> itself; that the engine stops on every id of
    # eos_ids is tested on the default model, and the Gemma file's ids are checked above)


def test_past_the_window_speculation_and_batching_stay_exact(gemma, monkeypatch):
    """A prompt of over 800 tokens: the sliding layers drop what is 512 positions back from what
    they hold (`KVCache.front`). A batch with a short prompt, and then lookup decoding continuing
    the cached prompt, give the tokens of decoding each alone with every position kept."""
    from gearshift import kv_cache

    text = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(160))
    long = gemma.tokenizer.encode(text)
    assert len(long) > 800
    short = gemma.encode([{"role": "user", "content": "Count to five."}])
    with monkeypatch.context() as mp:
        mp.setattr(kv_cache, "MOVE_EVERY", 10**9)
        kept = LLM(gemma.loaded, prefix_cache=False)
        alone = [kept.generate(p, max_tokens=24, temperature=0).token_ids for p in (long, short)]
    together = [c.token_ids for c in gemma.generate([long, short], max_tokens=24, temperature=0)]
    assert together == alone
    assert max(gemma.core.cache.front) > 0
    spec = gemma.generate(long, drafter="lookup", max_tokens=24, temperature=0)
    assert spec.token_ids == alone[0] and spec.stats.cached_tokens == len(long) - 1


def test_kv_policies_are_refused_with_one_line(gemma):
    with pytest.raises(GearshiftError, match="does not apply to gemma3") as e:
        gemma.generate("Hello", kv_policy="streaming", kv_budget=64, max_tokens=4)
    assert "\n" not in str(e.value)


def test_the_server_answers_chat_with_gemmas_turns(gemma):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ref = gemma.generate(question, max_tokens=24, temperature=0)
    app = create_app(lambda: LLM(gemma.loaded, max_num_seqs=2, max_model_len=1024), ServerConfig(model_name=NAME))
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=NAME, messages=question, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason
        bad = httpx.post(
            url + "/v1/chat/completions",
            json={"model": NAME, "messages": question, "max_tokens": 4, "kv_policy": "streaming"},
        )
        assert bad.status_code == 400 and "sliding-window" in json.loads(bad.text)["error"]["message"]


def test_greedy_output_parts_from_llama_cpps_only_at_near_ties(gemma):
    """The same GGUF through llama.cpp: where greedy outputs first differ, our logits had the two
    tokens close (llama.cpp quantizes activations to 8 bits, we keep int16 or float32 ones, so
    near-ties may fall either way); a wrong layer would part them at a wide gap. One prompt is past
    the sliding window."""
    if llama_cpp.binary("llama-server", LLAMA_CPP) is None:
        pytest.skip("llama.cpp is not built (gearshift build-llama-cpp)")
    text = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(120))
    prompts = [
        gemma.encode([{"role": "user", "content": "Explain why the sky is blue."}]),
        gemma.tokenizer.encode("The capital of France is"),
        gemma.tokenizer.encode(text),
    ]
    ours = [gemma.generate(p, max_tokens=32, temperature=0).token_ids for p in prompts]
    with llama_cpp.Server(gemma.loaded.path, threads=torch.get_num_threads(), prefix=LLAMA_CPP) as server:
        theirs = [server.complete(p, 32)["tokens"] for p in prompts]
    result = agreement(gemma, prompts, ours, theirs, 32)
    for row in result["prompts"]:
        assert row["agree"] >= 4, row
        if "gap_to_theirs" in row:
            assert row["gap_to_theirs"] < 1.0 and row["theirs_rank"] <= 2, row
