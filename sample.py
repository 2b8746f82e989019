"""
Generate text from a trained checkpoint.

    python sample.py --start="To be"                      # 3 samples from out/ckpt.pt (the best val weights)
    python sample.py --start=FILE:prompt.txt --num_samples=1 --top_p=0.9
    python sample.py --start="ROMEO:" --beams=4           # beam search: the likeliest continuation

Read top to bottom: the context window and its KV cache (each new token runs through the model alone, on
CUDA as a replayed graph) -> decoding (sampling, beam search) -> command line. Sampling goes: repetition
penalty -> temperature -> top-k -> top-p (nucleus) -> draw.
"""
import math
import os
import sys

import torch
from torch.nn import functional as F

from gpt import CharTokenizer, UserError, load_model, parse_args, pick_device, run_cli

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

LOWER = '--num_samples (or --beams) or --max_new_tokens'  # what to lower when memory runs out
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}

# -----------------------------------------------------------------------------
# The context window and the KV cache. A token's keys and values depend only on the tokens before it
# (attention is causal), so while the window stays put, those of earlier tokens never change: a cache keeps
# them, and each new token runs through the model alone. Past block_size tokens the window jumps forward by
# half a block; every position then shifts, and the cache is refilled from the new window in one forward.

def window_start(T, block_size):
    """Where the context window begins in a text of T tokens: 0 up to block_size tokens, then the overflow
    rounded up to a half block, so the model sees between block_size/2 and block_size tokens."""
    hop = max(1, block_size // 2)
    return 0 if T <= block_size else math.ceil((T - block_size) / hop) * hop

class KVCache:
    """The keys and values of the window's first `length` tokens, in every layer. GPT.forward reads `length`
    (where the new tokens' positions start) and calls layers[i].append; the caller advances it. Everything
    stays in place, at one size, so that the one-token step runs the same kernels on the same memory every
    time, and on CUDA can be captured once as a graph and replayed (one_token_step)."""

    def __init__(self, config):
        self.layers = [LayerCache(self, config.block_size) for _ in range(config.n_layer)]
        self.length = None  # a 0-d tensor on the model's device, as forward and a CUDA graph read it
        self.filled = 0  # the same number for Python to read: reading a tensor on a GPU waits for the GPU
        self.graph = None

    def clear(self, device):  # the window moved: forget every token
        if self.length is None:
            self.length = torch.zeros((), dtype=torch.long, device=device)
        self.length.zero_()  # in place, as in advance and reorder: a captured graph reads this very memory
        self.filled = 0

    def advance(self, n):  # the last forward's n tokens are in
        self.length += n
        self.filled += n

    @torch.inference_mode()  # the buffers were made in inference mode; only there may they change
    def reorder(self, rows):  # beam search: new row b continues the text of old row rows[b]
        for layer in self.layers:
            layer.k.copy_(layer.k[rows])
            layer.v.copy_(layer.v[rows])

class LayerCache:
    """One layer's keys and values, in buffers of block_size slots: slot i holds the window's token i."""

    def __init__(self, cache, block_size):
        self.cache, self.block_size, self.k, self.v, self.slots = cache, block_size, None, None, None

    def append(self, k, v):
        """Write the new tokens' k, v (B, nh, T, hs) into slots length.. length+T-1. Return every slot,
        (B, nh, block_size, hs) each, and the mask (T, block_size) of the slots each new token may attend to:
        itself and the tokens before it. Slots past it hold zeros or an older window's keys, masked out."""
        if self.k is None:  # the first call tells the batch size, head size, dtype and device
            B, nh, _, hs = k.shape  # zeros, not empty memory: a masked slot's weight is 0, and 0 * nan is nan
            self.k, self.v = k.new_zeros(B, nh, self.block_size, hs), v.new_zeros(B, nh, self.block_size, hs)
            self.slots = torch.arange(self.block_size, device=k.device)  # (block_size,)
        pos = self.cache.length + torch.arange(k.shape[2], device=k.device)  # (T,): the new tokens' positions
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v, self.slots <= pos[:, None]  # (T, 1) against (block_size,) -> (T, block_size)

def one_token_step(model, cache, token):
    """Logits (B, V) after `token` (B, 1), the newest token of a window whose earlier tokens the cache holds.
    On a CPU, one forward. On CUDA, a ~100-kernel forward of a token would spend most of its time in Python
    launching kernels, so the step is captured once as a CUDA graph, then replayed: one launch per token."""
    if token.device.type != 'cuda':
        return model(token, cache=cache)[0][:, -1]
    if cache.graph is None:  # capture, after a warm-up on the capture's own stream (as PyTorch's docs advise:
        cache.graph, cache.token, stream = torch.cuda.CUDAGraph(), token.clone(), torch.cuda.Stream()  # cuBLAS
        stream.wait_stream(torch.cuda.current_stream())  # and the allocator set up there, not while capturing)
        with torch.cuda.stream(stream):
            model(cache.token, cache=cache)  # it writes the slot that the replay below writes again
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(cache.graph, stream=stream):  # records the kernels, runs none
            cache.logits = model(cache.token, cache=cache)[0][:, -1]  # (B, V), in the graph's own memory
    cache.token.copy_(token)
    cache.graph.replay()
    return cache.logits.clone()  # the next replay overwrites cache.logits

@torch.inference_mode()  # no autograd bookkeeping; sample() makes ordinary tensors of the logits it gets
def next_logits(model, idx, cache=None):
    """Logits (B, V) for the token after idx (B, T), over idx's context window. Without a cache the whole
    window runs through the model. With one, only the newest token does, if the cache holds every token of
    the window before it; else (first call, the window moved) the cache is refilled with the whole window."""
    start = window_start(idx.shape[1], model.config.block_size)
    if cache is None:
        return model(idx[:, start:])[0][:, -1]
    if cache.filled and start + cache.filled == idx.shape[1] - 1:  # it holds the window but its newest token
        logits = one_token_step(model, cache, idx[:, -1:])
    else:  # a first call (it makes the buffers), or the window moved: refill the cache from the whole window
        cache.clear(idx.device)
        logits = model(idx[:, start:], cache=cache)[0][:, -1]
    cache.advance(idx.shape[1] - start - cache.filled)
    return logits

# -----------------------------------------------------------------------------
# Decoding: which token comes next, given the model's logits. Sampling draws one from a reshaped
# distribution; beam search keeps the few likeliest texts and returns the best.

def filter_logits(logits, idx, temperature, top_k, top_p, repetition_penalty):
    """Reshape the next-token logits (B, V) of texts idx (B, T): tokens the sampler may not pick get -inf."""
    if repetition_penalty != 1.0:  # CTRL's penalty: push the logits of tokens already seen towards "unlikely"
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, True)  # (B, V)
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature != 1.0:  # the likeliest token first moved to 0, the rest below: then at any temperature
        # above 0, however small (1e-40), the logits go to -inf at worst, never to inf, where softmax gives nan
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    k = min(top_k, logits.shape[-1])
    if k == logits.shape[-1] and top_p == 1.0:
        return logits  # every token stays: no sort at all
    values, order = torch.topk(logits, k)  # (B, k) each, likeliest first: a sort of k tokens, not of all V
    if top_p < 1.0:
        probs = F.softmax(values, dim=-1)  # (B, k): the top-k distribution, renormalized
        values = values.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float('-inf'))  # after the nucleus filled
    return torch.full_like(logits, float('-inf')).scatter_(1, order, values)  # (B, V)

def sample(model, idx, max_new_tokens, temperature=1.0, top_k=200, top_p=1.0, repetition_penalty=1.0,
           stopped=None, generator=None, on_token=None, use_cache=True):
    """Extend each row of idx (B, T); temperature=0 is greedy. stopped(idx) -> (B,) bools says which rows
    are finished: they get no more tokens (only their last one repeated, for the caller to trim).
    on_token(idx) is called after every step, for streaming. use_cache=False recomputes every window."""
    cache = KVCache(model.config) if use_cache else None
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
    for _ in range(max_new_tokens):
        logits = next_logits(model, idx, cache).float()  # (B, V)
        if temperature == 0:  # greedy, after the repetition penalty
            idx_next = filter_logits(logits, idx, 1.0, logits.shape[-1], 1.0, repetition_penalty).argmax(dim=-1)
        else:
            probs = F.softmax(filter_logits(logits, idx, temperature, top_k, top_p, repetition_penalty), dim=-1)
            idx_next = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
        if stopped is not None:
            idx_next = torch.where(done, idx[:, -1], idx_next)
        idx = torch.cat((idx, idx_next[:, None]), dim=1)  # (B, T + 1)
        if on_token:
            on_token(idx)
        if stopped is not None:
            done |= stopped(idx)
            if done.all():
                break
    return idx

def beam_search(model, idx, max_new_tokens, beams, length_penalty=1.0, stopped=None, use_cache=True):
    """The continuation of idx (1, T) with the highest log-probability, keeping the `beams` best partial
    texts at every step. Texts that stopped(idx) calls finished are ranked by logprob / length**length_penalty."""
    if max_new_tokens == 0:
        return idx
    cache = KVCache(model.config) if use_cache else None
    # All b beams from the start, so that the batch (and the cache) keeps one size: b copies of the prompt,
    # all but one at -inf, out of the race until they take over the likeliest continuations of the first.
    idx = idx.repeat(beams, 1)  # (b, T)
    scores = torch.full((beams,), float('-inf'), device=idx.device)  # (b,): total log-probability of each beam
    scores[0] = 0.0
    finished = []  # (normalized score, tokens)
    for step in range(1, max_new_tokens + 1):
        logprobs = F.log_softmax(next_logits(model, idx, cache).float(), dim=-1)  # (b, V)
        V = logprobs.shape[-1]
        scores, flat = (scores[:, None] + logprobs).flatten().topk(beams)  # (b,)
        parent, token = flat // V, flat % V
        idx = torch.cat((idx[parent], token[:, None]), dim=1)  # (b, T + step)
        if cache is not None:
            cache.reorder(parent)  # each beam's keys and values are those of the beam it grew from
        if stopped is not None:
            ended = stopped(idx)
            finished += [(s.item() / step ** length_penalty, row) for s, row in zip(scores[ended], idx[ended])]
            scores = scores.masked_fill(ended, float('-inf'))  # a finished beam grows no further
            if not torch.isfinite(scores).any():
                break
    finished += [(s.item() / max_new_tokens ** length_penalty, row) for s, row in zip(scores, idx) if s.isfinite()]
    return max(finished, key=lambda pair: pair[0])[1][None]  # (1, T + new)

# -----------------------------------------------------------------------------
# Command line: check the settings, read the prompt, generate, print (one sample streams as it comes).

def stop_check(tokenizer, stop, prompt_len):
    """stopped(idx) -> (B,) bools: does the text after the first prompt_len tokens hold `stop`? Checked on
    decoded text, as BPE may cut the stop text into tokens any way. It runs after every token, so a new
    stop text ends in the newest token: the last len(stop's bytes) tokens hold it (a token is a byte or more)."""
    n = len(stop.encode('utf-8'))

    def stopped(idx):
        tails = idx[:, max(prompt_len, idx.shape[1] - n):].tolist()
        return torch.tensor([stop in tokenizer.decode(tail) for tail in tails], device=idx.device)
    return stopped

def check(cfg, given):
    """One line for each setting that cannot work, naming the fix."""
    rules = [('temperature', cfg['temperature'] >= 0, 'must be 0 (greedy) or more'),
             ('top_k', cfg['top_k'] >= 1, 'must be 1 or more'),
             ('top_p', 0 < cfg['top_p'] <= 1, 'must be in (0, 1]'),
             ('repetition_penalty', cfg['repetition_penalty'] > 0, 'must be above 0 (1 turns it off)'),
             ('beams', cfg['beams'] >= 1, 'must be 1 or more'),
             ('max_new_tokens', cfg['max_new_tokens'] >= 0, 'must be 0 or more'),
             ('num_samples', cfg['num_samples'] >= 1, 'must be 1 or more'),
             ('seed', 0 <= cfg['seed'] < 2 ** 63, 'must be 0 or more and below 2**63'),
             ('length_penalty', math.isfinite(cfg['length_penalty']), 'must be a finite number')]
    for key, ok, why in rules:
        if not ok:
            raise UserError(f"--{key}={cfg[key]} {why}")
    clash = [k for k in ('temperature', 'top_k', 'top_p', 'repetition_penalty', 'num_samples') if k in given]
    if cfg['beams'] > 1 and clash:
        raise UserError(f"--beams={cfg['beams']} is deterministic beam search; drop --{clash[0]} (a sampling option), "
                        "or use --beams=1 to sample")

def write(text):
    """Print text as it comes. `| head` leaving early ends the run quietly, as a shell expects; any other
    failure to write (a full disk, a closed stdout) ends it in one line."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: no stdout at all (`>&-`)
        if sys.stdout:  # what its buffer still holds goes nowhere: exit's flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e, BrokenPipeError):
            sys.exit(141)  # 128 + SIGPIPE, as a shell reports it
        why = 'it is closed' if sys.stdout is None else getattr(e, 'strerror', None) or e
        raise UserError(f"cannot write the samples to standard output ({why})") from None

def main(argv):
    given = parse_args(argv, DEFAULTS, __file__)
    cfg = {**DEFAULTS, **given}
    check(cfg, given)
    dev = pick_device(cfg['device'])
    text = cfg['start']
    if text.startswith('FILE:'):
        try:  # newline='': the text as it is, \r\n too, as prepare.py reads training text
            with open(text[5:], encoding='utf-8', newline='') as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--start={text} cannot be read ({getattr(e, 'strerror', None) or e}); "
                            "give the path of a UTF-8 text file") from None
    if not text:
        raise UserError("--start is empty; give at least one character to continue, e.g. --start=$'\\n' in bash")
    path = cfg['out_dir']  # a run's best weights (ckpt.pt), or its latest (last.pt) if it has no best one yet
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, 'ckpt.pt')):
        path = os.path.join(path, 'last.pt') if os.path.isfile(os.path.join(path, 'last.pt')) else path
    model, tokenizer = load_model(path, dev)
    if isinstance(tokenizer, CharTokenizer) and (unknown := sorted(set(text) - tokenizer.stoi.keys())):  # BPE: any
        raise UserError("this model's vocabulary has no newline, the default start text; give one with --start=TEXT"
                        if text == DEFAULTS['start'] else
                        f"characters not in the model's vocabulary: {''.join(unknown)!r}; remove them")
    prompt = tokenizer.encode(text)
    idx = torch.tensor([prompt], dtype=torch.long, device=dev)
    stop = cfg['stop']
    stopped = stop_check(tokenizer, stop, idx.shape[1]) if stop else None

    def until_stop(ids):  # a sample's text, ending with the first stop text after the start (kept)
        sample_text = tokenizer.decode(ids)
        at = sample_text.find(stop, len(text)) if stop else -1
        return sample_text if at < 0 else sample_text[:at + len(stop)]

    if cfg['beams'] > 1:
        out = beam_search(model, idx, cfg['max_new_tokens'], cfg['beams'], cfg['length_penalty'], stopped)
        write(until_stop(out[0].tolist()) + '\n')
        return
    generator = torch.Generator(device=dev).manual_seed(cfg['seed'])
    stream = cfg['num_samples'] == 1
    shown, printed, tail = idx.shape[1], len(text), ''  # tokens and characters printed; the last few of them

    def show(idx):  # streaming: print the new characters, up to a stop text; decodes only the new tokens
        nonlocal shown, printed, tail
        piece = tokenizer.decode(idx[0, shown:].tolist())
        if piece.endswith('\ufffd'):  # wait: a BPE token may end inside a multi-byte character
            return
        seen = tail + piece  # a stop text may begin in characters already printed
        if stop and stop in seen:
            piece = seen[:seen.find(stop) + len(stop)][len(tail):]
        write(piece)
        shown, printed, tail = idx.shape[1], printed + len(piece), seen[max(0, len(seen) - len(stop) + 1):]

    if stream:
        write(text)
    out = sample(model, idx.repeat(cfg['num_samples'], 1), cfg['max_new_tokens'], cfg['temperature'],
                 cfg['top_k'], cfg['top_p'], cfg['repetition_penalty'], stopped, generator, show if stream else None)
    for i, row in enumerate(out.tolist()):
        write((until_stop(row)[printed:] if stream else f"{'-' * 20} sample {i + 1}\n{until_stop(row)}") + '\n')

def main_in_memory(argv):
    """main, with out of memory ended in one line that names what to lower."""
    try:
        main(argv)
    except (MemoryError, RuntimeError) as e:  # torch says "can't allocate" (CPU) or "Tried to allocate" (GPUs)
        if isinstance(e, RuntimeError) and 'allocate' not in str(e):
            raise
        raise UserError(f"out of memory; lower {LOWER}") from None

if __name__ == '__main__':
    run_cli(main_in_memory)
