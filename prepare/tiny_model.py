"""
The embedded default model M0: a byte-level BPE tokenizer trained here on the synthetic corpus, with a chat
template, and a ~0.9M-parameter Llama-architecture causal LM with random weights. Saved with save_pretrained, so
every later stage loads it with AutoTokenizer / AutoModelForCausalLM exactly as it would load a hub model.

Tokenizer choice: digits are split one by one (as in Llama/Qwen) so arithmetic is learned digit-wise, and the
newline is its own token, so a step boundary "\\n" + "Step" tokenizes the same alone or joined (tests check it).
The space before a number rides on its first digit (" 16" -> " 1", "6"; --digit-space joined, the default): a fifth
of the synthetic data's tokens would otherwise be that bare space, and the SFT's time follows the tokens
(docs/experiments.md; --digit-space own, Qwen2's choice, reproduces the default before 2026-12-04).
Reads:  --corpus (JSONL files whose string fields are the training text; default: the synthetic IFT and EFT files)
Writes: --out (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat template,
        build_config.json, and manifest.json: the corpus and flags that made it), written to <out>.tmp and renamed
        into place, so a build killed halfway never looks finished

    python -m prepare.tiny_model --corpus data/synthetic/ift.jsonl data/synthetic/eft.jsonl --out runs/default/m0
"""

import argparse
import os

import torch

from common import (cli, is_done, load_prompt, output_flags, positive_int, prompt_path, read_jsonl, save_config,
                    stage_manifest)
from modeling import save_model

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


PROMPTS = ["reasoning", "judge", "reasoning_tiny", "judge_tiny"]  # in the corpus: the model sees them in every stage


def corpus_texts(paths):
    """Every string in the records (and lists of strings), plus the prompt templates the model will see."""
    for path in paths:
        for r in read_jsonl(path):
            for v in r.values():
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (x for x in v if isinstance(x, str))
    for name in PROMPTS:
        yield load_prompt(name)


def build_tokenizer(texts, vocab_size, digit_space="joined"):
    """digit_space="own": " 16" -> " ", "1", "6" (the space is a token of its own, as in Qwen2's tokenizer);
    "joined": " 1", "6" (the space rides on the first digit: a fifth fewer tokens in the synthetic data)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    digits = {"own": pre_tokenizers.Digits(individual_digits=True),
              "joined": pre_tokenizers.Split(Regex(r" ?\d"), "isolated")}[digit_space]
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def build_model(tokenizer, hidden, layers, heads, max_len, seed):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_len, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=["data/synthetic/ift.jsonl", "data/synthetic/eft.jsonl"])
    parser.add_argument("--out", default="runs/default/m0")
    parser.add_argument("--vocab-size", type=positive_int, default=512)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--heads", type=positive_int, default=4)
    # 1024: the SRLM judge (SRLM_EFT) reads a whole solution and writes up to 448 tokens; no weights depend on it
    parser.add_argument("--max-len", type=positive_int, default=1024, help="context length (positions)")
    parser.add_argument("--digit-space", default="joined", choices=["own", "joined"],
                        help='the space before a number: its own token (" 16" -> " ", "1", "6") or joined to the '
                             'first digit (" 1", "6"); digits are single tokens either way')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    inputs = dict(corpus=args.corpus, prompts=[prompt_path(name) for name in PROMPTS])
    manifest = stage_manifest("tiny_model", inputs, output_flags(args))
    if is_done(args.out, manifest, args.overwrite, [args.out.rstrip("/") + ".tmp"]):
        return
    tokenizer = build_tokenizer(corpus_texts(args.corpus), args.vocab_size, args.digit_space)
    model = build_model(tokenizer, args.hidden, args.layers, args.heads, args.max_len, args.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    def build_config(folder):
        save_config(args, os.path.join(folder, "build_config.json"))
    save_model(model, tokenizer, args.out, manifest, build_config)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny model: {n / 1e6:.2f}M parameters, vocab {len(tokenizer)}, saved to {args.out}")


if __name__ == "__main__":
    cli(main)
