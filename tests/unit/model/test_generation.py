"""Generation: cached decoding == full forward, the rolling buffer past the window, parity with transformers'
greedy ``generate`` on left-padded batches, per-row EOS stopping, sampling controls, input checks.

All on tiny random configs (conftest.TINY: sliding_window=5), CPU, fp32.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, hf_pair, make_ours

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


def _left_padded(lengths, width=None, seed=0, vocab=TINY["vocab_size"]):
    """Random prompts (ids >= 3: no pad/BOS/EOS) left-padded to ``width``."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : width - n] = 0
        mask[row, : width - n] = 0
    return ids, mask


def _full_forward_logits(model, sequences, prompt_mask, steps):
    """Next-token logits of every generated step from one no-cache forward over the whole sequence."""
    B, T0 = prompt_mask.shape
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, sequences.shape[1] - T0)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(sequences, attention_mask=mask, position_ids=pos, use_cache=False).logits
    return logits[:, T0 - 1: T0 - 1 + steps]  # (B, steps, V)


class CacheWatcher:
    """A streamer that, after every step, records how many slots each layer's cache holds."""

    def __init__(self, cache):
        self.cache, self.slots, self.puts, self.ended = cache, [], 0, False

    def put(self, value):
        self.puts += 1
        if self.puts > 1:  # the first put is the prompt, before any forward
            self.slots.append([k.shape[2] for k in self.cache.keys])

    def end(self):
        self.ended = True


@pytest.mark.parametrize("window", [None, 64])
def test_cached_decoding_equals_full_forward(window):
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM, sliding_window=window)
    ids, mask = _left_padded([6, 4, 1])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                         return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (3, 14)
    assert torch.equal(out.sequences[:, :6], ids)
    step_logits = torch.stack(out.logits, dim=1)  # (B, steps, V)
    ref = _full_forward_logits(model, out.sequences, mask, 8)
    assert (step_logits - ref).abs().max().item() < ATOL
    # and the no-cache loop (a full forward per step) makes the same tokens
    nocache = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], use_cache=False)
    assert torch.equal(nocache, out.sequences)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rolling_cache_past_window_equals_full_forward(attn):
    from mistral_ft import MistralCache, MistralForCausalLM

    W = TINY["sliding_window"]
    model = make_ours(MistralForCausalLM, seed=1)
    model.config.attn_implementation = attn
    ids, mask = _left_padded([9, 3, 7], seed=1)  # the longest prompt is already past the window
    cache = MistralCache(model.config.num_hidden_layers, W)
    watcher = CacheWatcher(cache)
    steps = 4 * W
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=[], past_key_values=cache,
                         streamer=watcher, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (3, 9 + steps) and watcher.ended
    assert len(watcher.slots) == steps
    assert all(n <= W for per_layer in watcher.slots for n in per_layer), watcher.slots
    assert all(n == W for n in watcher.slots[-1])  # the buffer is full, not just small
    assert cache.seen == 9 + steps - 1  # the last token was never fed back
    ref = _full_forward_logits(model, out.sequences, mask, steps)
    assert (torch.stack(out.logits, dim=1) - ref).abs().max().item() < ATOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_matches_transformers_left_padded_past_window(tmp_path, attn):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", attn, seed=2)
    ids, mask = _left_padded([11, 2, 6, 8], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=15, eos_token_id=2)  # both stop rows at 2 (config default)
    a = ours.generate(ids, **kw)
    b = theirs.generate(ids, do_sample=False, pad_token_id=0, **kw)
    assert a.shape == (4, 26)
    assert torch.equal(a, b)


def _first_new_token_of_row(seqs, row, T0, exclude):
    """A token that greedy decoding produces in ``row`` but not in the other rows' first steps."""
    for tok in seqs[row, T0:].tolist():
        if tok not in exclude:
            return tok
    raise AssertionError("no suitable token")


def test_eos_stops_each_row_and_matches_transformers(tmp_path):
    ours, theirs, _ = hf_pair(tmp_path, "MistralForCausalLM", seed=3)
    ids, mask = _left_padded([7, 4, 5], seed=3)
    T0, steps = 7, 12
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=[])  # [] = no EOS
    # choose as "EOS" the 3rd new token of row 1: row 1 must stop there, the rows that never produce it go on
    eos = int(free[1, T0 + 2])
    stopped = ours.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=0)
    hf = theirs.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
    assert torch.equal(stopped, hf)
    first = (free[1, T0:] == eos).nonzero()[0].item()
    assert torch.equal(stopped[1, : T0 + first + 1], free[1, : T0 + first + 1])
    assert (stopped[1, T0 + first + 1:] == 0).all()  # a finished row emits pad
    for row in range(3):
        hit = (free[row, T0:] == eos).nonzero()
        if len(hit) == 0:  # a row that never meets EOS is untouched
            assert torch.equal(stopped[row], free[row, : stopped.shape[1]])


def test_stops_when_every_row_is_finished():
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM, seed=4)
    ids, mask = _left_padded([5, 5], seed=4)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    eos = [int(free[0, 5]), int(free[1, 5])]  # each row's first new token
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert out.shape == (2, 6)  # one step, then everyone is done
    assert torch.equal(out, free[:, :6])


def test_right_padding_is_refused():
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM)
    ids, mask = _left_padded([4, 4])
    mask[1, -1] = 0
    with pytest.raises(ValueError, match=r"row 1 .*right-padded.*padding_side = 'left'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    mask[1] = 0
    mask[1, 0] = 1  # [1, 0, 0, 0] is right padding too
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_mask_is_inferred_from_pad_and_left_padding_matches_explicit_mask():
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM)
    ids, mask = _left_padded([6, 3])
    a = model.generate(ids, max_new_tokens=4, eos_token_id=[])
    b = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(a, b)
    # a left-padded row generates what the same prompt alone generates
    alone = model.generate(ids[1:, 3:], max_new_tokens=4, eos_token_id=[])
    assert torch.equal(alone[0, -4:], b[1, -4:])


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy():
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM, seed=5)
    ids, mask = _left_padded([5, 2], seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    s1 = model.generate(ids, do_sample=True, seed=7, **kw)
    s2 = model.generate(ids, do_sample=True, seed=7, **kw)
    s3 = model.generate(ids, do_sample=True, seed=8, temperature=2.0, **kw)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)  # 24 draws from a near-uniform 128-way distribution
    greedy = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, seed=1, **kw), greedy)
    assert torch.equal(model.generate(ids, do_sample=True, top_p=1e-6, seed=1, **kw), greedy)


def test_process_logits_top_k_top_p():
    from mistral_ft.model.generation import process_logits

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = logits.softmax(-1)[0]  # ~ [0.64, 0.24, 0.09, 0.03]
    kept = lambda s: torch.isfinite(s[0]).tolist()  # noqa: E731
    assert kept(process_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(process_logits(logits, top_p=float(p[0]) - 0.01)) == [True, False, False, False]
    assert kept(process_logits(logits, top_p=float(p[0]) + 0.01)) == [True, True, False, False]
    assert kept(process_logits(logits, top_p=1.0)) == [True] * 4


def test_top_p_exactly_on_a_cumulative_probability_matches_transformers():
    """top_p equal to a cumulative mass keeps exactly the tokens that reach it (the boundary token after them is
    dropped). Dyadic probabilities make every sum exact in fp32, so the boundary is hit bit for bit."""
    import math

    import transformers

    from mistral_ft.model.generation import process_logits

    logits = torch.tensor([[math.log(0.125), math.log(0.5), math.log(0.125), math.log(0.25)]])
    assert logits.softmax(-1).tolist() == [[0.125, 0.5, 0.125, 0.25]]
    kept = lambda s: torch.isfinite(s[0]).tolist()  # noqa: E731
    for top_p, want in ((0.5, [False, True, False, False]), (0.75, [False, True, False, True])):
        assert kept(process_logits(logits, top_p=top_p)) == want, top_p
        hf = transformers.TopPLogitsWarper(top_p=top_p)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        assert kept(hf) == want, ("transformers", top_p)
    # just past a boundary the next token comes in
    assert kept(process_logits(logits, top_p=0.5000001)) == [False, True, False, True]
    assert torch.allclose(process_logits(logits, temperature=2.0), logits / 2)


def test_bad_arguments_are_clear_errors():
    from mistral_ft import MistralForCausalLM

    model = make_ours(MistralForCausalLM, max_position_embeddings=16)
    ids, _ = _left_padded([17])
    with pytest.raises(ValueError, match="17 tokens long.*max_position_embeddings = 16"):
        model.generate(ids, max_new_tokens=1)
    ids, _ = _left_padded([4])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        model.generate(ids, do_sample=True, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        model.generate(ids, max_new_tokens=-1)
    with pytest.warns(UserWarning, match="max_position_embeddings = 16"):
        out = model.generate(ids, max_new_tokens=30, eos_token_id=[])
    assert out.shape == (1, 16)
    assert model.generate(ids, max_length=6, eos_token_id=[]).shape == (1, 6)  # transformers' max_length
    assert torch.equal(model.generate(inputs=ids, max_new_tokens=2, eos_token_id=torch.tensor([2])),
                       model.generate(ids, max_new_tokens=2))  # transformers' spellings
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        model.generate([[5, 6, 7]], max_new_tokens=1)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A real HF folder (config.json + safetensors + tokenizer.model), 32000-token vocabulary, window 8."""
    from mistral_ft.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "base", seed=11,
                      overrides={"sliding_window": 8, "max_position_embeddings": 64})


def _reference_texts(model, tok, prompts, **kw):
    texts = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        texts.append(tok.batch_decode(model.generate(ids, **kw), skip_special_tokens=True)[0])
    return texts


PROMPTS = ["Hello 🫠 wörld", "  two leading spaces\nand a newline\n", "日本語"]


def test_cli_streams_exactly_batch_decode(tiny_folder, capsys):
    from mistral_ft import MistralForCausalLM
    from mistral_ft.generate import main
    from mistral_ft.tokenizer import MistralTokenizer

    argv = ["--model", str(tiny_folder), "--max-new-tokens", "20"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    out = capsys.readouterr().out
    model, tok = MistralForCausalLM.from_pretrained(tiny_folder), MistralTokenizer.from_pretrained(tiny_folder)
    expected = _reference_texts(model, tok, PROMPTS, max_new_tokens=20)
    assert out == "".join(t + "\n" for t in expected)
    assert out.startswith("Hello 🫠 wörld") and "  two leading spaces\nand a newline\n" in out  # prompt echoed
    assert all(len(t) > len(p) for t, p in zip(expected, PROMPTS))  # something was generated


def test_cli_sampling_is_reproducible(tiny_folder, capsys):
    from mistral_ft.generate import main

    argv = ["--model", str(tiny_folder), "--prompt", "Once upon a time", "--max-new-tokens", "8",
            "--do-sample", "--top-k", "50", "--top-p", "0.95", "--temperature", "1.5", "--seed", "3",
            "--dtype", "bfloat16", "--attn", "eager"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("Once upon a time") and first.endswith("\n")


def test_cli_chat_uses_v1_format_until_exit(tiny_folder, capsys, monkeypatch):
    import io

    from mistral_ft import MistralForCausalLM
    from mistral_ft.generate import main
    from mistral_ft.tokenizer import MistralTokenizer

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n\nTell me more 🙂\n/exit\nnever read\n"))
    assert main(["--model", str(tiny_folder), "--chat", "--system", "Be brief.", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    model, tok = MistralForCausalLM.from_pretrained(tiny_folder), MistralTokenizer.from_pretrained(tiny_folder)
    messages, replies = [{"role": "system", "content": "Be brief."}], []
    for user in ["Hi there", "Tell me more 🙂"]:
        messages.append({"role": "user", "content": user})
        ids, _ = tok.encode_chat(messages)
        new = model.generate(torch.tensor([ids]), max_new_tokens=8)[0, len(ids):]
        replies.append(tok.decode(new, skip_special_tokens=True))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert out == "".join(r + "\n" for r in replies)


def _lora_adapter(base_folder, out, seed=0):
    from peft import LoraConfig, get_peft_model

    from mistral_ft import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(out)
    return peft_model


def test_cli_adapter_matches_peft_model_and_refuses_another_base(tiny_folder, tmp_path, capsys):
    from mistral_ft.generate import main
    from mistral_ft.model.tiny import build_tiny
    from mistral_ft.tokenizer import MistralTokenizer

    peft_model = _lora_adapter(tiny_folder, tmp_path / "adapter")
    tok = MistralTokenizer.from_pretrained(tiny_folder)
    expected = _reference_texts(peft_model.get_base_model(), tok, ["Hello"], max_new_tokens=12)
    base_only = _reference_texts(peft_model.get_base_model().__class__.from_pretrained(tiny_folder), tok, ["Hello"],
                                 max_new_tokens=12)
    assert expected != base_only  # the adapter changes the output, so the check below means something
    assert main(["--model", str(tiny_folder), "--adapter", str(tmp_path / "adapter"), "--prompt", "Hello",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"

    # the same run folder layout train.py writes: adapter/ with its base in adapter_config.json
    (tmp_path / "run").mkdir()
    (tmp_path / "adapter").rename(tmp_path / "run" / "adapter")
    assert main(["--run", str(tmp_path / "run"), "--prompt", "Hello", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"

    other = build_tiny(tmp_path / "other", seed=1, overrides={"hidden_size": 32, "intermediate_size": 96})
    _lora_adapter(other, tmp_path / "other_adapter")
    rc = main(["--model", str(tiny_folder), "--adapter", str(tmp_path / "other_adapter"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "was trained on base" in err and "hidden_size: 32 (adapter's base) vs 64 (--model)" in err
    # the base folder is gone (trained elsewhere): the shape check still catches it
    import shutil

    shutil.rmtree(other)
    rc = main(["--model", str(tiny_folder), "--adapter", str(tmp_path / "other_adapter"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit --model" in err and "lora_A" in err


def test_cli_clear_errors(tiny_folder, tmp_path, capsys):
    from mistral_ft.generate import main

    assert main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "no such folder" in err and "Traceback" not in err

    long_prompt = "word " * 80  # > max_position_embeddings = 64 tokens
    assert main(["--model", str(tiny_folder), "--prompt", "ok", "--prompt", long_prompt]) == 2
    captured = capsys.readouterr()
    assert "--prompt #2 is" in captured.err and "at most 64" in captured.err
    assert captured.out == ""  # checked before anything is generated

    assert main(["--run", str(tmp_path), "--prompt", "x"]) == 2
    assert "no model/ or adapter/ folder" in capsys.readouterr().err
    import shutil  # a full fine-tuning run: model/ is a complete HF folder

    shutil.copytree(tiny_folder, tmp_path / "model")
    assert main(["--run", str(tmp_path), "--prompt", "ok", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("ok")
    with pytest.raises(ValueError, match="at most 64"):
        main(["--model", str(tiny_folder), "--prompt", long_prompt, "--debug"])


def test_cli_chat_survives_an_empty_answer(tmp_path, capsys, monkeypatch):
    """A model that answers with EOS at once (a weakly trained one does) must not break the next turn."""
    import io

    from mistral_ft import MistralForCausalLM
    from mistral_ft.generate import main
    from mistral_ft.model.tiny import build_tiny

    folder = build_tiny(tmp_path / "eos")
    model = MistralForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = 1.0  # every position predicts EOS
    model.save_pretrained(folder)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAgain\n"))
    assert main(["--model", str(folder), "--chat", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "\n\n" and captured.err.count("empty answer") == 2
