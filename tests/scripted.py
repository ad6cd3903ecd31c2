"""
A scripted model for tests of generation's stopping rules: a 1-layer Llama whose greedy (and, by a wide margin,
sampled) next token is a fixed function of the current token, so a test writes the continuation it wants --
a step marker at the start, a step marker later, an EOS, a verdict, a run to the token limit -- and checks what
each engine makes of it. Its tokenizer's pad token is its EOS (as Qwen2.5's and SmolLM2's are).

How: attention and MLP write nothing (o_proj and down_proj are zero), so the last hidden state is the current
token's embedding, RMS-normalized; lm_head row `next` is the sum of the normalized embeddings of the tokens that
lead to it (x 10), so the scripted successor scores ~80 and any other token ~0 +- 30.
"""

import torch

from prepare import tiny_model

PIECES = ["\n", "Step", "Q", "[[", "A", "]]", "E", "C", "D", "x", "y", "z", "w", "v"]
# current token -> next token; every token reached has a successor, so the chain never leaves the script
SCRIPT = {"x": "\n",                        # x: "\nStepQ\nStep..." -- a step marker opens the continuation
          "y": "C", "C": "\n",              # y: "C\nStepQ..." -- one step "C", stopped at the next marker
          "\n": "Step", "Step": "Q", "Q": "\n",
          "z": "D", "D": "<|endoftext|>",   # z: "D" then EOS
          "w": "E", "E": "E",               # w: "EEEE..." up to the token limit
          "v": "[[", "[[": "A", "A": "]]", "]]": "E"}  # v: "[[A]]EEE..." -- a verdict, then more text
EOS = "<|endoftext|>"
# what generation makes of each script at 12 new tokens, written by hand: prompt -> [(text, eos, new_tokens)] for
# MODES: one step (a marker that opens the continuation is not a stop: "x" stops at its second), plain, and the
# judge's stop at the verdict
MAX_NEW_TOKENS = 12
MODES = [dict(one_step=True), dict(), dict(stop_at_verdict=True)]
EXPECTED = {
    "x": [("StepQ", False, 5), ("StepQ\nStepQ\nStepQ\nStepQ", False, 12), ("StepQ\nStepQ\nStepQ\nStepQ", False, 12)],
    "y": [("C", False, 3), ("C\nStepQ\nStepQ\nStepQ\nStep", False, 12), ("C\nStepQ\nStepQ\nStepQ\nStep", False, 12)],
    "z": [("D", True, 2)] * 3,
    "w": [("E" * 12, False, 12)] * 3,
    "v": [("[[A]]" + "E" * 9, False, 12), ("[[A]]" + "E" * 9, False, 12), ("[[A]]", False, 3)],
}


def build(out_dir, seed=0, hidden=64):
    """Save the scripted model and its tokenizer (pad = EOS) to out_dir; returns {piece: token id}."""
    corpus = ["\nStepQ\n[[A]]\n[[A]]EEE\nCDxyzwv\nStep\n"] * 200
    tokenizer = tiny_model.build_tokenizer(corpus, vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token
    # the chat template adds nothing, so a test picks the prompt's last token (chat_prompt would add "\n" without one)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = {}
    for piece in PIECES:
        token_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        assert len(token_ids) == 1, (piece, token_ids)
        ids[piece] = token_ids[0]
    ids[EOS] = tokenizer.eos_token_id
    model = tiny_model.build_model(tokenizer, hidden=hidden, layers=1, heads=2, max_len=256, seed=seed)
    model.config.tie_word_embeddings = False
    model.config.pad_token_id = tokenizer.pad_token_id
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(embeddings))
        for current, following in SCRIPT.items():
            e = embeddings[ids[current]]
            model.lm_head.weight[ids[following]] += 10 * e / e.norm()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return ids
