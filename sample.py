"""
Generate text from a trained checkpoint.

    python sample.py --start="To be"                      # 3 samples from out/ckpt.pt (the best val weights)
    python sample.py --start=FILE:prompt.txt --num_samples=1 --top_p=0.9
    python sample.py --start="ROMEO:" --beams=4           # beam search: the likeliest continuation

Sampling goes: repetition penalty -> temperature -> top-k -> top-p (nucleus) -> draw. Each new token
runs through the model alone, thanks to gpt.py's KV cache.
"""
import os
import sys

import torch
from torch.nn import functional as F

from gpt import CHOICES, KVCache, UserError, load_model, parse_args, pick_device, run_cli

out_dir = 'out'  # the training run to sample from; its ckpt.pt holds the weights with the best val loss
start = '\n'  # the text every sample continues; FILE:path reads it from a file
num_samples = 3  # how many samples, generated together as one batch
max_new_tokens = 500  # tokens to generate per sample
temperature = 0.8  # below 1 more predictable, above 1 more surprising; 0 always picks the likeliest token
top_k = 200  # draw only from the k likeliest tokens (clamped to the vocabulary size)
top_p = 1.0  # nucleus sampling: draw only from the likeliest tokens whose probabilities add up to top_p
repetition_penalty = 1.0  # above 1 makes tokens already in the text less likely (1 turns it off)
stop = ''  # a sample ends once this text appears (it is kept); empty: no stop text
beams = 1  # above 1: beam search, the continuation with the highest total log-probability
length_penalty = 1.0  # beam search ranks finished beams by log-probability / length**length_penalty
seed = 1337  # the same seed gives the same text
device = 'auto'  # 'auto' picks cuda, then mps, then cpu

config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}


def filter_logits(logits, idx, temperature, top_k, top_p, repetition_penalty):
    """Reshape the next-token logits (B, V) of texts idx (B, T): tokens the sampler may not pick get -inf."""
    if repetition_penalty != 1.0:  # CTRL's penalty: push the logits of tokens already seen towards "unlikely"
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)  # (B, V)
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits / temperature
    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1): the k-th largest logit
    logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus is already full
        logits = logits.masked_fill(outside.scatter(1, order, outside), float('-inf'))
    return logits


@torch.no_grad()
def sample(model, idx, max_new_tokens, temperature=1.0, top_k=200, top_p=1.0, repetition_penalty=1.0,
           stopped=None, generator=None, on_token=None):
    """Extend each row of idx (B, T); temperature=0 is greedy. stopped(idx) -> (B,) bools says which rows
    are finished: they get no more tokens (only their last one repeated, for the caller to trim).
    on_token(idx) is called after every step, for streaming."""
    cache = KVCache(len(model.blocks))
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
    for _ in range(max_new_tokens):
        logits = model.next_logits(idx, cache).float()  # (B, V)
        if temperature == 0:  # greedy, after the repetition penalty
            idx_next = filter_logits(logits, idx, 1.0, logits.shape[-1], 1.0, repetition_penalty).argmax(dim=-1)  # (B,)
        else:
            probs = F.softmax(filter_logits(logits, idx, temperature, top_k, top_p, repetition_penalty), dim=-1)
            idx_next = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
        idx_next = torch.where(done, idx[:, -1], idx_next)
        idx = torch.cat((idx, idx_next[:, None]), dim=1)  # (B, T + 1)
        if on_token:
            on_token(idx)
        if stopped is not None:
            done |= stopped(idx)
            if done.all():
                break
    return idx


@torch.no_grad()
def beam_search(model, idx, max_new_tokens, beams, length_penalty=1.0, stopped=None):
    """The continuation of idx (1, T) with the highest log-probability, keeping the `beams` best partial
    texts at every step. Texts that stopped(idx) calls finished are ranked by logprob / length**length_penalty."""
    if max_new_tokens == 0:
        return idx
    cache = KVCache(len(model.blocks))
    scores = torch.zeros(1, device=idx.device)  # (b,): total log-probability of each beam
    finished = []  # (normalized score, tokens)
    for step in range(1, max_new_tokens + 1):
        logprobs = F.log_softmax(model.next_logits(idx, cache).float(), dim=-1)  # (b, V)
        V = logprobs.shape[-1]
        scores, flat = (scores[:, None] + logprobs).flatten().topk(min(beams, logprobs.numel()))  # (b,)
        parent, token = flat // V, flat % V
        idx = torch.cat((idx[parent], token[:, None]), dim=1)  # (b, T + step)
        for layer in cache.layers:  # each beam's cache rows follow the beam it grew from
            layer[:] = [t[parent] for t in layer]
        if stopped is not None:
            ended = stopped(idx)
            finished += [(s.item() / step ** length_penalty, row) for s, row in zip(scores[ended], idx[ended])]
            scores = scores.masked_fill(ended, float('-inf'))  # a finished beam grows no further
            if not torch.isfinite(scores).any():
                break
    finished += [(s.item() / max_new_tokens ** length_penalty, row) for s, row in zip(scores, idx) if s.isfinite()]
    return max(finished, key=lambda pair: pair[0])[1][None]  # (1, T + new)


def check(cfg, given):
    """One line for each setting that cannot work, naming the fix."""
    rules = [('temperature', cfg['temperature'] >= 0, 'must be 0 (greedy) or more'),
             ('top_k', cfg['top_k'] >= 1, 'must be 1 or more'),
             ('top_p', 0 < cfg['top_p'] <= 1, 'must be in (0, 1]'),
             ('repetition_penalty', cfg['repetition_penalty'] > 0, 'must be above 0 (1 turns it off)'),
             ('beams', cfg['beams'] >= 1, 'must be 1 or more'),
             ('max_new_tokens', cfg['max_new_tokens'] >= 0, 'must be 0 or more'),
             ('num_samples', cfg['num_samples'] >= 1, 'must be 1 or more')]
    for key, ok, why in rules:
        if not ok:
            raise UserError(f"--{key}={cfg[key]} {why}")
    clash = [k for k in ('temperature', 'top_k', 'top_p', 'repetition_penalty', 'num_samples') if k in given]
    if cfg['beams'] > 1 and clash:
        raise UserError(f"--beams={cfg['beams']} is deterministic beam search; drop --{clash[0]} (a sampling option), "
                        "or use --beams=1 to sample")


def main(argv):
    given = parse_args(argv, DEFAULTS, __file__, {'device': CHOICES['device']})
    cfg = {**DEFAULTS, **given}
    check(cfg, given)
    text = cfg['start']
    if text.startswith('FILE:'):
        try:
            with open(text[5:], encoding='utf-8') as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--start={text} cannot be read ({getattr(e, 'strerror', None) or e}); "
                            "give the path of a UTF-8 text file") from None
    if not text:
        raise UserError("--start is empty; give at least one character to continue, e.g. --start=$'\\n' in bash")
    dev = pick_device(cfg['device'])
    model, tokenizer = load_model(cfg['out_dir'], dev)
    idx = torch.tensor([tokenizer.encode(text)], dtype=torch.long, device=dev)
    stop = cfg['stop']

    def until_stop(ids):  # a sample's text, ending with the first stop text after the start (kept)
        sample_text = tokenizer.decode(ids)
        at = sample_text.find(stop, len(text)) if stop else -1
        return sample_text if at < 0 else sample_text[:at + len(stop)]

    def stopped(idx):  # on decoded text: with BPE the stop text may fall across token boundaries any way
        return torch.tensor([stop in tokenizer.decode(row)[len(text):] for row in idx.tolist()], device=idx.device)

    if cfg['beams'] > 1:
        out = beam_search(model, idx, cfg['max_new_tokens'], cfg['beams'], cfg['length_penalty'], stopped if stop else None)
        print(until_stop(out[0].tolist()))
        return
    generator = torch.Generator(device=dev).manual_seed(cfg['seed'])
    stream = cfg['num_samples'] == 1
    shown = 0  # characters of a streamed sample printed so far

    def show(idx):  # streaming: print the new characters as they come
        nonlocal shown
        now = until_stop(idx[0].tolist())
        if not now.endswith('\ufffd'):  # else wait: a BPE token may end inside a multi-byte character
            sys.stdout.write(now[shown:])
            sys.stdout.flush()
            shown = len(now)

    out = sample(model, idx.repeat(cfg['num_samples'], 1), cfg['max_new_tokens'], cfg['temperature'],
                 cfg['top_k'], cfg['top_p'], cfg['repetition_penalty'], stopped if stop else None, generator,
                 show if stream else None)
    for i, row in enumerate(out.tolist()):
        print(until_stop(row)[shown:] if stream else f"{'-' * 20} sample {i + 1}\n{until_stop(row)}")


if __name__ == '__main__':
    run_cli(main)
