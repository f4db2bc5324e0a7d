"""PolicyModel: sampling layout, masks, and completion-only hidden states that match a full forward."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer

from sdpo.config import GenerationConfig
from sdpo.policy_model import PolicyModel, completion_tokens_mask
from sdpo.self_distillation import chunked_token_logprobs


def test_completion_mask_keeps_first_eos_only():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 3, 3, 3]])
    assert completion_tokens_mask(ids, eos_token_id=1).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
    ]


def test_generate_groups_and_left_padding(tiny_llama):
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    prompts = [policy.encode_prompt("Q: 1+2="), policy.encode_prompt("Q: 10+20=")]
    torch.manual_seed(0)
    p_ids, p_mask, c_ids, c_mask = policy.generate(prompts, 3, GenerationConfig(max_new_tokens=5))
    assert p_ids.shape[0] == c_ids.shape[0] == 6
    assert (
        p_mask[:3, 0].tolist() == [0, 0, 0] and p_mask[3:].all()
    )  # the shorter prompt is left-padded
    assert (p_ids[0][p_mask[0].bool()] == torch.tensor(prompts[0])).all()
    assert c_ids.shape[1] <= 5 and (c_ids[c_mask == 0] == tok.pad_token_id).all()


def test_min_new_tokens_fixes_the_length(tiny_llama):
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    _, _, c_ids, c_mask = policy.generate(
        [policy.encode_prompt("ab")], 4, GenerationConfig(max_new_tokens=7, min_new_tokens=7)
    )
    assert c_mask.sum(-1).tolist() == [7, 7, 7, 7]


def test_completion_hidden_matches_full_forward_logprobs(tiny_llama):
    """Hidden state P-1+j predicts completion token j, with left padding, as in a plain forward."""
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    torch.manual_seed(1)
    p_ids, p_mask, c_ids, c_mask = policy.generate(
        [policy.encode_prompt("x"), policy.encode_prompt("hello there")],
        2,
        GenerationConfig(max_new_tokens=6),
    )
    hidden = policy.completion_hidden(p_ids, p_mask, c_ids, c_mask)
    ours = chunked_token_logprobs(hidden, policy.lm_head.weight, c_ids, chunk_size=4)
    for row in range(c_ids.shape[0]):  # reference: each row alone, no padding at all
        prompt = p_ids[row][p_mask[row].bool()]
        completion = c_ids[row][c_mask[row].bool()]
        full = torch.cat([prompt, completion]).unsqueeze(0)
        logits = model(full).logits[0, len(prompt) - 1 : -1]
        ref = logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(ours[row][: len(completion)], ref, rtol=1e-4, atol=1e-5)


def test_chat_prompts_go_through_the_chat_template(tiny_llama):
    model, tok = tiny_llama
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    policy = PolicyModel(model=model, tokenizer=tok)
    ids = policy.encode_prompt(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    )
    assert tok.decode(ids) == "<system>be brief\n<user>2+2?\n<assistant>"


def test_decode_drops_padding_and_eos(tiny_llama):
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    ids = torch.tensor([tok("42").input_ids + [tok.eos_token_id, tok.pad_token_id]])
    assert policy.decode(ids, completion_tokens_mask(ids, tok.eos_token_id)) == ["42"]


def test_sampler_matches_a_plain_forward_and_filters(tiny_gpt2):
    """Greedy tokens equal the argmax of a full forward on the growing sequence; top-k 1 == greedy."""
    from sdpo.policy_model import _filter

    model, tok = tiny_gpt2
    policy = PolicyModel(model=model, tokenizer=tok)
    prompts = [policy.encode_prompt("ab"), policy.encode_prompt("hello")]
    _, _, greedy_ids, _ = policy.generate(
        prompts, 1, GenerationConfig(max_new_tokens=5, min_new_tokens=5), greedy=True
    )
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for j in range(5):
            logits = model(torch.tensor([seq])).logits[0, -1]
            logits[tok.eos_token_id] = float("-inf")
            seq.append(int(logits.argmax()))
            assert greedy_ids[row, j] == seq[-1]
    torch.manual_seed(0)
    _, _, top1, _ = policy.generate(
        prompts, 1, GenerationConfig(max_new_tokens=5, min_new_tokens=5, top_k=1)
    )
    assert torch.equal(top1, greedy_ids)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(_filter(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    kept = ~torch.isinf(_filter(logits, 0, 0.7))  # p = .64, .24, ...: the first two reach 0.7
    assert kept.tolist() == [[True, True, False, False]]


def test_sampling_frequencies_follow_the_distribution():
    from sdpo.policy_model import _draw, _filter

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.0, 0.2]])).repeat(20000, 1)
    draws = _draw(_filter(logits, 0, 1.0).softmax(-1))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.0, 0.2]), atol=0.015, rtol=0)
    assert freq[2] == 0  # a zero-probability token is never drawn


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_blocked_draw_follows_the_distribution_across_block_edges(block):
    """The two-level draw (block sums, then inside the block) with an all-zero block, zeros at
    block edges and a ragged last block."""
    from sdpo.policy_model import _draw

    p = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.4, 0.05, 0.0, 0.3, 0.0])
    torch.manual_seed(0)
    draws = _draw(p.expand(40000, -1), block)
    freq = torch.bincount(draws, minlength=len(p)).float() / len(draws)
    torch.testing.assert_close(freq, p, atol=0.012, rtol=0)
    assert (freq[p == 0] == 0).all()


def test_distinct_rows_keep_first_appearance_order():
    from sdpo.policy_model import _distinct_rows

    ids = torch.tensor([[0, 7, 8], [0, 7, 8], [5, 6, 9], [0, 7, 8], [5, 6, 9], [0, 0, 8]])
    mask = (ids != 0).long()
    first, inverse = _distinct_rows(ids, mask)
    assert first.tolist() == [0, 2, 5] and inverse.tolist() == [0, 0, 1, 0, 1, 2]
    assert torch.equal(ids[first][inverse], ids)
    assert _distinct_rows(ids[[0, 2, 5]], mask[[0, 2, 5]]) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_pass_equals_the_single_pass_with_gradients(arch, tiny_llama, tiny_gpt2):
    """Rows with the same prompt share one prompt pass (KV cache expanded to the rows): the hidden
    states and the parameter gradients equal those of one pass over [prompt | completion]."""
    model, tok = tiny_llama if arch == "llama" else tiny_gpt2
    model.eval()  # no dropout (GPT-2), so that the two passes see the same function
    policy = PolicyModel(model=model, tokenizer=tok)
    torch.manual_seed(3)
    p_ids, p_mask, c_ids, c_mask = policy.generate(
        [policy.encode_prompt("x"), policy.encode_prompt("hello there")],
        3,
        GenerationConfig(max_new_tokens=6),
    )
    grads, hiddens = [], []
    for share in (False, True):
        model.zero_grad()
        hidden = policy.completion_hidden(p_ids, p_mask, c_ids, c_mask, share_prompts=share)
        (hidden * c_mask.unsqueeze(-1)).pow(2).sum().backward()
        hiddens.append(hidden.detach()[c_mask.bool()])
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(hiddens[1], hiddens[0], rtol=1e-4, atol=1e-5)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_shared_prefill_samples_what_one_prompt_at_a_time_samples(tiny_llama):
    """G copies of a prompt share the prefill; greedy rows equal the single-copy greedy row."""
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    prompts = [policy.encode_prompt("ab"), policy.encode_prompt("hello")]
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    _, _, one, _ = policy.generate(prompts, 1, config, greedy=True)
    _, _, three, _ = policy.generate(prompts, 3, config, greedy=True)
    assert torch.equal(three, one.repeat_interleave(3, dim=0))


def test_sampler_reaches_the_far_tail_of_a_large_vocabulary():
    """Every token is drawn at its probability, however small. In a float32 CDF a token below half
    an ulp of the running sum (~3e-8 near 1) gets an empty interval and can never be drawn: here
    about half of a 151,936-token tail (2e-3 of the mass) was unreachable: 0 hits of ~19 expected."""
    from sdpo.policy_model import _draw

    vocab = 151_936
    probs = torch.full((1, vocab), 2.9e-8)
    probs[0, 0] = 0.5
    probs[0, -1] = 1 - float(probs[0, :-1].double().sum())
    cdf32 = probs.cumsum(-1)[0]
    unreachable32 = torch.cat([cdf32[:1] == 0, cdf32[1:] == cdf32[:-1]])  # empty float32 intervals
    mass = float(probs[0, unreachable32].double().sum())
    assert mass > 1e-3  # the float32 CDF leaves this much of the mass undrawable
    torch.manual_seed(0)
    rows, chunks = 512, 16
    hits = sum(int(unreachable32[_draw(probs.expand(rows, vocab))].sum()) for _ in range(chunks))
    expected = mass * rows * chunks
    assert abs(hits - expected) < 4 * expected**0.5, (hits, expected)


def _scaled_family(family: str):
    """A tiny model of a family whose HF forward scales the LM head's logits."""
    import transformers

    common = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if family == "granite":  # logits / logits_scaling
        config = transformers.GraniteConfig(**common, logits_scaling=8.0)
    elif family == "hyperclovax":  # logits * logits_scaling
        config = transformers.HyperCLOVAXConfig(**common, logits_scaling=0.25)
    elif family == "minicpm3":  # hidden / (hidden_size / dim_model_base) before the head
        config = transformers.MiniCPM3Config(
            **{**common, "num_key_value_heads": 4}, dim_model_base=8, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4,
            qk_rope_head_dim=4, v_head_dim=8,
        )  # fmt: skip
    else:  # falcon_h1: logits * lm_head_multiplier
        config = transformers.FalconH1Config(
            **common, lm_head_multiplier=0.3, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
            mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16,
        )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a spread of logits big enough for the scaling to matter
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize("family", ["granite", "hyperclovax", "minicpm3", "falcon_h1"])
def test_training_logprobs_apply_the_models_logit_scaling(family, tmp_path):
    """The training passes (here the trainer's old-log-prob pass) equal the HF forward's
    log-softmax for models that scale their logits; they ignored the scaling before (0.2 nats)."""
    from sdpo.demo import build_char_tokenizer
    from sdpo.policy_model import RolloutBatch

    tok = build_char_tokenizer()
    policy = PolicyModel(model=_scaled_family(family), tokenizer=tok, device="cpu")
    assert policy.logit_scale != 1.0
    trainer = make_trainer(
        tmp_path / "run",
        reward=lambda prompts, completions, **kw: [0.0] * len(completions),
        rows=[{"prompt": "Q: 1+2="}],
        policy=policy,
        defaults={},
        num_samples_per_prompt=2,
        generation__max_new_tokens=5,
        generation__temperature=0.7,
        run__progress_bar=False,
    )
    prompts = ["Q: 1+2=", "Q: 30+4="]
    prompt_ids, prompt_mask = policy.pad_left([policy.encode_prompt(p) for p in prompts])
    completion_ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rollouts = RolloutBatch(
        prompts, prompt_ids, prompt_mask, completion_ids, completion_mask, ["", ""],
        torch.tensor([0, 1]), [{}, {}],
    )  # fmt: skip
    got = trainer.loss.old_logprobs(rollouts)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        logits = policy.model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    p = prompt_ids.shape[1]
    want = torch.log_softmax(logits[:, p - 1 : p - 1 + 5].float() / 0.7, -1)
    want = want.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    m = completion_mask.bool()
    torch.testing.assert_close(got[m], want[m], rtol=1e-4, atol=1e-4)


def test_a_logit_transform_that_is_not_a_constant_factor_is_refused():
    from sdpo.demo import build_char_tokenizer

    model = _scaled_family("granite")
    PolicyModel(model=model, tokenizer=build_char_tokenizer())  # a constant factor: accepted
    forward = model.forward

    def squashed(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits.tanh()
        return out

    model.forward = squashed
    with pytest.raises(ValueError, match="not lm_head"):
        PolicyModel(model=model, tokenizer=build_char_tokenizer())


def test_logit_scale_probe_refuses_a_biased_head_scaled_before_the_bias():
    # MiniCPM3 computes lm_head(h / s): with a biased head that is W·h/s + b, not (W·h + b)/s,
    # which is what the chunked head computes. The probe's rtol 1e-2 accepted a small bias.
    from sdpo.demo import build_char_tokenizer

    model = _scaled_family("minicpm3")
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(
            0.05 * torch.randn(old.out_features, generator=torch.Generator().manual_seed(0))
        )
    model.set_output_embeddings(head)
    with pytest.raises(ValueError, match="before a biased LM head"):
        PolicyModel(model=model, tokenizer=build_char_tokenizer())


def test_logit_scale_probe_refuses_a_scale_slightly_off_the_declared_one():
    from sdpo.demo import build_char_tokenizer

    model = _scaled_family("granite")
    assert PolicyModel(model=model, tokenizer=build_char_tokenizer()).logit_scale == 1 / 8.0
    forward = model.forward

    def off(*args, **kwargs):  # 0.5% away from 1/logits_scaling: rtol 1e-2 accepted it
        out = forward(*args, **kwargs)
        out.logits = out.logits * 1.005
        return out

    model.forward = off
    with pytest.raises(ValueError, match="not lm_head"):
        PolicyModel(model=model, tokenizer=build_char_tokenizer())
