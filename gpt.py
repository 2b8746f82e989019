"""
The reference GPT: a transformer language model over characters (or byte-level BPE tokens), trained from
scratch, in one file. Read it top to bottom: config -> tokenizer -> data -> model -> evaluation ->
checkpoints -> watching a run -> training -> entry point.

    python gpt.py                            # a small model on the CPU in about 5 minutes
    python gpt.py --n_layer=6 --device=cuda  # override any setting below; --help lists them all
"""
import argparse
import csv
import difflib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Config. Each value can be overridden on the command line as --key=value; the comment after
# it is what `python gpt.py --help` prints. The defaults train a small model on a laptop CPU.
# I/O
out_dir = 'out'  # where checkpoints go: last.pt (to resume) and ckpt.pt (best val, to sample)
data_dir = 'data'  # where prepare.py wrote train.bin, val.bin and meta.json
init_from = 'scratch'  # 'scratch' starts a new model, 'resume' continues out_dir/last.pt
eval_interval = 500  # evaluate (and save checkpoints) every this many iterations
eval_iters = 30  # batches of fixed windows per split at each evaluation
log_interval = 50  # print the training loss every this many iterations
# data
batch_size = 32  # how many independent sequences are trained on in parallel
gradient_accumulation_steps = 1  # micro-batches per optimizer step: batch_size x this x processes per step
block_size = 128  # the longest context the model sees, in tokens
# model
n_layer = 4  # number of transformer blocks
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream (channels per token)
dropout = 0.0  # probability of zeroing activations in training; helps long runs on small data
# optimizer: AdamW with linear warmup, then cosine decay
learning_rate = 2e-3  # peak learning rate, reached at the end of warmup
max_iters = 1500  # how many optimizer steps to train for
warmup_iters = 100  # steps of linear warmup at the start
lr_decay_iters = 1500  # step where the cosine decay reaches min_lr (usually = max_iters)
min_lr = 2e-4  # learning rate after the decay (about learning_rate / 10)
weight_decay = 0.1  # AdamW weight decay, applied to 2-D weight matrices only
beta1 = 0.9  # AdamW momentum of the gradient
beta2 = 0.99  # AdamW momentum of the squared gradient
grad_clip = 1.0  # clip the gradient norm to this value; 0 turns clipping off
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu
dtype = 'auto'  # 'auto' is bfloat16 on CUDA (float16 on older GPUs) and float32 elsewhere
compile = True  # torch.compile the model on CUDA; CPU runs stay eager, where it does not pay
seed = 1337  # seeds every random choice: same seed, same run

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
CHOICES = {'init_from': ('scratch', 'resume'), 'device': ('auto', 'cpu', 'cuda', 'mps'),
           'dtype': ('auto', 'float32', 'bfloat16', 'float16')}


class UserError(Exception):
    """A mistake the user can fix (a setting, a missing file): printed as one line, exit code 2."""


def boolean(text):  # argparse names this function in its errors: "invalid boolean value: 'maybe'"
    if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(text)
    return text.lower() in ('true', '1')


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line the caller can catch
        raise UserError(message)


def run_cli(main):
    """Run a script's main(argv); a UserError ends it with one line on stderr and exit code 2, no traceback."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv, defaults, source, choices={}):
    """Parse --key=value overrides of `defaults`. Returns only the keys given. Each value must parse as
    its default's type; the help text of a key is its comment in the `source` file."""
    with open(source, encoding='utf-8') as f:
        comments = dict(re.findall(r"^(\w+) = .*?  # (.*)$", f.read(), re.M))
    parser = _Parser(description=f'Settings of {os.path.basename(source)}; pass them as --key=value.',
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    for key, default in defaults.items():
        kind = boolean if isinstance(default, bool) else type(default)
        parser.add_argument(f'--{key}', type=kind, choices=choices.get(key), metavar=kind.__name__.upper(),
                            help=f"{comments.get(key, '')} (default: {default!r})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        close = difflib.get_close_matches(unknown[0].split('=', 1)[0].lstrip('-'), defaults, n=1)
        raise UserError(f"unknown setting '{unknown[0]}'; " + (f"did you mean --{close[0]}?" if close else "see --help"))
    return vars(args)


# -----------------------------------------------------------------------------
# Tokenizer: text <-> integer ids. Two kinds, chosen by prepare.py and stored in data_dir/meta.json and
# in every checkpoint: characters (the vocabulary is the sorted set of characters in the text), and
# byte-level BPE (start from the 256 byte values, then fuse frequent pairs of ids into new ids).

class CharTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab  # id -> character
        self.stoi = {ch: i for i, ch in enumerate(vocab)}  # character -> id
        self.vocab_size = len(vocab)

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UserError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; remove them")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return ''.join(self.vocab[i] for i in ids)


def merge(ids, pair, new_id):
    """Replace each occurrence of `pair` in the id array `ids`, left to right, by new_id."""
    hits = np.flatnonzero((ids[:-1] == pair[0]) & (ids[1:] == pair[1]))
    if pair[0] == pair[1] and len(hits) > 1:  # in a run like 'aaa' the pairs overlap: the left one wins
        keep = [hits[0]]
        for i in hits[1:].tolist():
            if i > keep[-1] + 1:
                keep.append(i)
        hits = np.array(keep)
    ids = ids.copy()
    ids[hits] = new_id
    return np.delete(ids, hits + 1)


class BPETokenizer:
    """Byte-level BPE: a text is its UTF-8 bytes (ids 0-255); then merge i, in the order they were learned,
    fuses each neighbouring pair (a, b) into id 256 + i. Any text encodes, in any language."""

    def __init__(self, merges):
        self.merges = [tuple(pair) for pair in merges]
        self.vocab_size = 256 + len(merges)
        self.bytes = [bytes([i]) for i in range(256)]  # id -> the bytes it stands for
        for a, b in self.merges:
            self.bytes.append(self.bytes[a] + self.bytes[b])

    def encode(self, text):
        ids = np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)
        for i, pair in enumerate(self.merges):
            ids = merge(ids, pair, 256 + i)
        return ids.tolist()

    def decode(self, ids):  # a cut through a multi-byte character decodes as U+FFFD instead of failing
        return b''.join(self.bytes[i] for i in ids).decode('utf-8', errors='replace')


def load_tokenizer(meta):  # meta: the 'tokenizer' entry of meta.json, also stored in every checkpoint
    return BPETokenizer(meta['merges']) if meta['kind'] == 'bpe' else CharTokenizer(meta['vocab'])


# -----------------------------------------------------------------------------
# Data: prepare.py wrote the token ids once as uint16 files; we read them through np.memmap, so a corpus
# never has to fit in memory. A training example is a window of block_size tokens (x) and the same
# window shifted one to the right (y): at every position the model learns to predict the next token.

def read_meta():
    with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
        return json.load(f)


def tokens(split):
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')


def batch_at(split, starts):
    """The windows beginning at `starts`, as inputs x and targets y, each (len(starts), block_size)."""
    data = tokens(split)
    rows = torch.from_numpy(data[np.asarray(starts)[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:]  # (B, T) each; y is x shifted by one
    if device.startswith('cuda'):  # pinned memory lets the copy to the GPU overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_batch(split):
    """A random batch: batch_size windows at random offsets (drawn from torch's seeded generator)."""
    starts = torch.randint(len(tokens(split)) - block_size, (batch_size,))
    return batch_at(split, starts.numpy())


# -----------------------------------------------------------------------------
# Model: a decoder-only transformer. Tokens become vectors (token + position embeddings), pass through
# n_layer blocks of attention (tokens exchange information) and a feed-forward net (each token thinks
# alone), and a final linear layer turns each vector into logits over the vocabulary.

@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0


class Head(nn.Module):
    """One head of causal self-attention, written out step by step. MultiHeadAttention computes all
    heads at once with a fused kernel; a test checks it gives the same numbers as these Heads."""

    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer('tril', torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs): what each token offers
        q = self.query(x)  # (B, T, hs): what each token looks for
        wei = (q @ k.transpose(-2, -1)) * k.shape[-1] ** -0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))  # a token may not look ahead
        wei = F.softmax(wei, dim=-1)  # (B, T, T): each row sums to 1
        wei = self.dropout(wei)
        v = self.value(x)  # (B, T, hs): what each token passes on
        return wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)


class MultiHeadAttention(nn.Module):
    """n_head Heads side by side, computed as one batch: one matmul makes q, k, v for every head, and
    F.scaled_dot_product_attention does Head's math (flash attention on CUDA)."""

    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # the query, key, value of all heads at once
        self.proj = nn.Linear(n_embd, n_embd)  # mixes the heads' outputs back into the residual stream
        self.dropout_p = dropout  # a probability here: the kernel applies the dropout itself
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # cache: None in training; in generation this layer's list, empty at first, then [k, v] of all tokens so far
        if cache is not None:  # generation: prepend the keys and values of the tokens seen before
            if cache:
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)  # (B, nh, past+T, hs)
            cache[:] = [k, v]
        # New queries sit at the end of the sequence: each may see every earlier key and itself.
        S = k.shape[2]
        mask = None if S == T else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout_p if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """A two-layer MLP applied to each position on its own, 4x wider inside."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)  # back into the residual stream
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward), each added to the residual stream.
    LayerNorm comes before each part (pre-norm), which keeps deep stacks stable."""

    def __init__(self, n_embd, n_head, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = MultiHeadAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.ffwd = FeedForward(n_embd, dropout)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.ffwd(self.ln2(x))


class KVCache:
    """Keys and values of the tokens already processed, per layer, so that generation feeds each new
    token alone. `start` is where in the text the cached window begins."""

    def __init__(self, n_layer):
        self.layers, self.start = [[] for _ in range(n_layer)], 0  # each list becomes [k, v], (B, nh, L, hs) each

    def reset(self, start):  # the window moved: start over
        self.layers, self.start = [[] for _ in self.layers], start

    def __len__(self):
        return self.layers[0][0].shape[2] if self.layers[0] else 0


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config.n_embd, config.n_head, config.dropout) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: reading and writing a token share a vector
        # GPT-2 init: small normal weights, and the projections that write into the residual stream
        # scaled by 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('proj.weight'):  # attn.proj and ffwd.proj
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy loss if targets are given.
        With a KVCache, idx holds only the new tokens and continues the cached ones."""
        B, T = idx.shape
        past = len(cache) if cache is not None else 0
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def window_start(self, T):
        """Where the context window begins in a text of T tokens. Up to block_size tokens it is all of
        them; past that the window jumps forward by half a block at a time, so the model always sees
        between block_size/2 and block_size tokens and a KV cache is refilled only every block_size/2 steps."""
        block, hop = self.config.block_size, max(1, self.config.block_size // 2)
        return 0 if T <= block else math.ceil((T - block) / hop) * hop  # the overflow, rounded up to a hop

    @torch.no_grad()
    def next_logits(self, idx, cache=None):
        """Logits (B, V) for the token after idx (B, T), computed over idx's context window.
        Without a cache the whole window runs through the model. With one, only tokens the cache has not
        seen do. That is exact because of causality: a token's keys and values depend only on the tokens
        before it, so those of earlier tokens never change as the text grows, until the window moves."""
        start = self.window_start(idx.shape[1])
        if cache is None:
            return self(idx[:, start:])[0][:, -1]
        if cache.start != start:  # the window moved: positions shifted, so every key and value changes
            cache.reset(start)
        return self(idx[:, start + len(cache):], cache=cache)[0][:, -1]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens. temperature=0 picks the likeliest token;
        top_k keeps only the k likeliest. use_cache=False recomputes the whole window for every token."""
        cache = KVCache(len(self.blocks)) if use_cache else None
        for _ in range(max_new_tokens):
            logits = self.next_logits(idx, cache).float()  # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float('-inf'))
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx


# -----------------------------------------------------------------------------
# Evaluation: the mean loss of each split over a fixed set of windows, the same ones at every eval.
# Evals are then comparable across runs, free of sampling noise, and draw no random numbers (so a resumed
# run stays exact). With the defaults the val split is covered whole.

def eval_starts(split):
    n = (len(tokens(split)) - 1) // block_size  # non-overlapping windows that fit in the split
    k = min(n, eval_iters * batch_size)
    return (np.arange(k) * n // k) * block_size  # k of those windows, spread evenly over the split


def autocast():
    """Mixed precision when dtype asks for it: matmuls in bfloat16 (or float16), reductions in float32."""
    return nullcontext() if dtype == 'float32' else torch.autocast(device.split(':')[0], getattr(torch, dtype))


def bits_per_char(loss, meta):
    """Val loss in nats per token -> bits per character of the val text: comparable across tokenizers."""
    return loss * meta['val_tokens'] / meta['val_chars'] / math.log(2)


@torch.no_grad()
def estimate_loss(model, splits=('train', 'val')):
    was_training = model.training
    model.eval()  # dropout off
    out = {}
    for split in splits:
        starts = eval_starts(split)
        total = torch.zeros((), device=device)
        for i in range(0, len(starts), batch_size):
            x, y = batch_at(split, starts[i:i + batch_size])
            with autocast():
                total += model(x, y)[1].float() * len(x)  # the batch's mean loss, weighted by its size
        out[split] = total.item() / len(starts)
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors, numbers, strings and lists, so that torch.load(weights_only=True)
# reads them and loading one never runs code. out_dir/last.pt is the latest state, which a resumed run
# continues; out_dir/ckpt.pt is the state with the best val loss so far, which sample.py loads.

def save_checkpoint(state, path):
    """Atomic: write a temporary file beside `path`, flush it to disk, then rename it over `path`.
    A crash at any moment leaves the old checkpoint or the new one, never a broken one."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Read a checkpoint (a file, or an out_dir holding ckpt.pt) on the CPU, or say clearly why not."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train a model first: python gpt.py")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if 'Unsupported global' in str(e):  # a pickled class or function: loading it could run code
            raise UserError(f"{path} holds pickled Python objects, which could run code on load; refusing it "
                            "(gpt.py only loads checkpoints made of tensors and plain values)") from None
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): truncated, or another "
                        "kind of file; train again or pick another file") from None
    if not isinstance(ckpt, dict) or not {'model', 'model_args', 'tokenizer', 'config'} <= ckpt.keys():
        raise UserError(f"{path} is a torch file but not a gpt.py checkpoint")
    return ckpt


def load_model(path, device='cpu'):
    """A checkpoint (file or out_dir) -> (model in eval mode on `device`, its tokenizer)."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), load_tokenizer(ckpt['tokenizer'])


# -----------------------------------------------------------------------------
# Watching a run: out_dir/log.csv (a row per log step and per eval), out_dir/loss.svg (the loss curves,
# drawn with the standard library alone) and out_dir/samples.txt (a short sample at every eval).

LOG_FIELDS = ('iter', 'elapsed_s', 'train_loss', 'val_loss', 'val_bpc', 'lr', 'tokens_per_s')


def start_logs(resumed_at=None):
    """Start log.csv and samples.txt afresh, or on resume keep them up to the checkpoint's iteration: what
    a run wrote after its last checkpoint belongs to training that was lost. Returns the rows of log.csv."""
    log, samples = os.path.join(out_dir, 'log.csv'), os.path.join(out_dir, 'samples.txt')
    rows, blocks = [], []
    if resumed_at is not None and os.path.exists(log):
        with open(log, newline='', encoding='utf-8') as f:
            rows = [r for r in csv.DictReader(f) if int(r['iter']) <= resumed_at]
    if resumed_at is not None and os.path.exists(samples):
        with open(samples, encoding='utf-8') as f:
            blocks = re.split(r'^(?=--- iter \d+$)', f.read(), flags=re.M)  # each begins "--- iter N"
        blocks = [b for b in blocks if b and int(b.split()[2]) <= resumed_at]
    with open(log + '.tmp', 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(log + '.tmp', log)
    with open(samples, 'w', encoding='utf-8') as f:
        f.writelines(blocks)
    return rows


def append_log(rows, **row):
    row = {k: row.get(k, '') for k in LOG_FIELDS}
    rows.append(row)
    with open(os.path.join(out_dir, 'log.csv'), 'a', newline='', encoding='utf-8') as f:
        csv.DictWriter(f, LOG_FIELDS).writerow(row)


def plot_losses(rows, path):
    """An SVG line chart of train and val loss at each eval, against the iteration."""
    evals = [r for r in rows if r['val_loss'] != '']
    its = [int(r['iter']) for r in evals]
    series = {'train': [float(r['train_loss']) for r in evals], 'val': [float(r['val_loss']) for r in evals]}
    lo, hi = min(min(v) for v in series.values()), max(max(v) for v in series.values())
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 0.1 else (lo, hi)
    W, H, left, right, top, bottom = 640, 400, 60, 20, 20, 50  # canvas and margins, in pixels
    x = lambda it: left + (W - left - right) * it / max(its[-1], 1)
    y = lambda v: top + (H - top - bottom) * (hi - v) / (hi - lo)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<path d="M{left},{top} V{H - bottom} H{W - right}" fill="none" stroke="black"/>']
    for i in range(6):  # ticks: six on each axis
        it, v = its[-1] * i / 5, lo + (hi - lo) * i / 5
        out.append(f'<text x="{x(it):.1f}" y="{H - bottom + 16}" text-anchor="middle">{it:.0f}</text>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        out.append(f'<path d="M{x(it):.1f},{H - bottom} v4 M{left},{y(v):.1f} h-4" stroke="black"/>')
    out.append(f'<text x="{(W + left) / 2}" y="{H - 12}" text-anchor="middle">iteration</text>')
    out.append(f'<text transform="translate(16,{(H - bottom) / 2}) rotate(-90)" text-anchor="middle">loss</text>')
    for (name, values), color, row in zip(series.items(), ('#1f77b4', '#d62728'), (0, 1)):
        points = ' '.join(f'{x(it):.1f},{y(v):.1f}' for it, v in zip(its, values))
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - right - 90}" y="{top + 16 + 18 * row}" fill="{color}">— {name} loss</text>')
    best = min(range(len(its)), key=lambda i: series['val'][i])
    out.append(f'<circle cx="{x(its[best]):.1f}" cy="{y(series["val"][best]):.1f}" r="5" fill="none" stroke="black"/>')
    out.append(f'<text x="{x(its[best]) - 8:.1f}" y="{y(series["val"][best]) - 10:.1f}" text-anchor="end">'
               f'best val {series["val"][best]:.4f}</text></svg>')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.write('\n'.join(out) + '\n')
    os.replace(path + '.tmp', path)


def generate_text(model, tokenizer, n):
    """n new tokens after a newline, with a fixed seed: the same text for the same weights."""
    was_training = model.training
    model.eval()
    try:
        start = tokenizer.encode('\n')
    except UserError:  # a text without newlines: start from its first character instead
        start = [0]
    out = model.generate(torch.tensor([start], device=device), n,
                         generator=torch.Generator(device=device).manual_seed(seed))
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


# -----------------------------------------------------------------------------
# Training.

def get_lr(it):
    """Linear warmup (starting above zero, so no step is wasted), then cosine decay down to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def configure_optimizer(model):
    """AdamW; weight decay pulls the 2-D weight matrices (and embeddings) towards zero, not biases or norms."""
    groups = [{'params': [p for p in model.parameters() if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    fused = device.split(':')[0] in ('cuda', 'cpu')  # one kernel for all parameters: 10% faster steps on a CPU too
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=fused)


# Several processes (torchrun, DistributedDataParallel): setup() says which one this is. Each process
# trains on its own batches, DDP averages the gradients, and process 0 alone evaluates, logs and saves.
rank, local_rank, world_size = 0, 0, 1


def build(tokenizer, ckpt=None):
    """The model, its optimizer and loss scaler: new, or restored from a checkpoint to continue exactly."""
    torch.manual_seed(seed + rank)  # processes draw different batches; DDP copies process 0's initial weights
    model_args = dict(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=dropout)  # on resume, setup() made the shape that of the checkpoint
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = configure_optimizer(model)
    scaler = torch.amp.GradScaler(enabled=dtype == 'float16')  # float16 needs loss scaling; bfloat16 does not
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        for group, decay in zip(optimizer.param_groups, (weight_decay, 0.0)):  # settings given now win
            group.update(weight_decay=decay, betas=(beta1, beta2))
        if ckpt['scaler'] and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        if rank < len(ckpt['rng']):  # the batches and dropout masks continue where they were
            torch.set_rng_state(ckpt['rng'][rank]['cpu'])
            if ckpt['rng'][rank]['cuda'] is not None and device.startswith('cuda'):
                torch.cuda.set_rng_state(ckpt['rng'][rank]['cuda'], device)
    return model, optimizer, scaler


def rng_states():
    """The random-number-generator states of every process (a collective call under DDP)."""
    mine = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.startswith('cuda') else None}
    states = [mine] * world_size
    if world_size > 1:
        dist.all_gather_object(states, mine)
    return states


def compiled(model):
    """torch.compile on CUDA, where fused kernels pay off. On a CPU it made the small default model slower
    (bench.py train: 41 ms/iter compiled, 38 eager), so CPU runs stay eager, as do runs where it fails."""
    if not (compile and device.startswith('cuda')):
        return model
    try:
        fast = torch.compile(model)
        with torch.random.fork_rng(devices=[device]), autocast():  # random numbers stay as they were
            fast(*batch_at('train', np.arange(batch_size)))  # compile now, so a failure shows here, not mid-run
        return fast
    except Exception as e:
        print(f"warning: torch.compile cannot run here ({type(e).__name__}); training without it")
        return model


def train_step(model, optimizer, scaler, lr):
    """One optimizer step over gradient_accumulation_steps fresh batches; returns their mean loss (a tensor:
    reading it would wait for the GPU). Under DDP the gradients are averaged over processes once, at the end."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    total = 0.0
    for micro in range(gradient_accumulation_steps):
        x, y = get_batch('train')
        last = micro == gradient_accumulation_steps - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast():
                _, loss = model(x, y)
            loss = loss / gradient_accumulation_steps  # so the gradients add up to those of the mean loss
            scaler.scale(loss).backward()
        total += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def train(ckpt=None):
    """The training loop. `ckpt` is the checkpoint a resumed run continues from."""
    meta = read_meta()
    tokenizer = load_tokenizer(meta['tokenizer'])
    model, optimizer, scaler = build(tokenizer, ckpt)
    step_model = compiled(model)
    if world_size > 1:
        step_model = DDP(step_model, device_ids=[local_rank] if device.startswith('cuda') else None)
    master = rank == 0  # the one process that evaluates, prints and writes files
    iter_num, best_val_loss, val_bpc = 0, math.inf, None  # val_bpc: of the latest eval
    if ckpt:
        iter_num, best_val_loss, val_bpc = ckpt['iter_num'], ckpt['best_val_loss'], ckpt['val_bpc']
    tokens_per_iter = batch_size * block_size * gradient_accumulation_steps * world_size
    rows = start_logs(iter_num if ckpt else None) if master else []
    if master:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} in {dtype}; "
              f"{tokens_per_iter:,} tokens per iteration = batch_size {batch_size} x block_size {block_size} x "
              f"gradient_accumulation_steps {gradient_accumulation_steps} x {world_size} processes; "
              f"{f'resuming at iter {iter_num}' if ckpt else 'from scratch'}")
    t_start = time.time() - (float(rows[-1]['elapsed_s']) if rows else 0.0)  # elapsed time counts across resumes
    start_iter, it_log, t_log, t_shown, lossf = iter_num, iter_num, time.time(), 0.0, float('nan')
    tty = sys.stdout.isatty()
    stop = []  # the signal that asked us to stop: we finish the current step, save, and exit

    def save(names):
        state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                 'model_args': asdict(model.config), 'config': {k: globals()[k] for k in DEFAULTS},
                 'tokenizer': meta['tokenizer'], 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                 'val_bpc': val_bpc, 'rng': rng_states()}  # every process takes part in gathering the states
        for name in names if master else ():
            save_checkpoint(state, os.path.join(out_dir, name))

    def give_up(what):
        sys.exit(f"error: {what} at iter {iter_num}: training diverged; lower --learning_rate (now {learning_rate}) or "
                 f"raise --warmup_iters; the checkpoints in {out_dir}/ from the last good eval are untouched")

    def say(line):  # on a terminal, first wipe the progress line
        if master:
            print(('\r\033[K' if tty else '') + line)

    def speed():  # seconds per iteration since the last log line, and the time left at that pace
        dt = (time.time() - t_log) / max(1, iter_num - it_log)
        left = round((max_iters - iter_num) * dt)
        return dt, f"{tokens_per_iter / dt:,.0f} tok/s, ETA {left // 60}m{left % 60:02d}s"

    def stopping():  # under DDP all processes must stop at the same step: they agree at each log step
        if world_size == 1:
            return bool(stop)
        if iter_num % log_interval:
            return False
        flag = torch.tensor(float(bool(stop)), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if (iter_num % eval_interval == 0 or iter_num == max_iters) and (iter_num > start_iter or ckpt is None):
                names = ['last.pt']
                if master:
                    losses = estimate_loss(model)
                    if not all(math.isfinite(v) for v in losses.values()):
                        give_up(f"the eval loss is {losses['val']}")
                    val_bpc = bits_per_char(losses['val'], meta)
                    say(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                        f"val {val_bpc:.4f} bits/char")
                    append_log(rows, iter=iter_num, elapsed_s=round(time.time() - t_start, 2),
                               train_loss=round(losses['train'], 4), val_loss=round(losses['val'], 4),
                               val_bpc=round(val_bpc, 4), lr=f'{get_lr(iter_num):.4g}')
                    plot_losses(rows, os.path.join(out_dir, 'loss.svg'))
                    with open(os.path.join(out_dir, 'samples.txt'), 'a', encoding='utf-8') as f:
                        f.write(f"--- iter {iter_num}\n{generate_text(model, tokenizer, 200)}\n")
                    if losses['val'] < best_val_loss:
                        best_val_loss = losses['val']
                        names.insert(0, 'ckpt.pt')
                save(names)
                it_log, t_log = iter_num, time.time()  # the eval does not count in the training speed
            if iter_num >= max_iters:
                break
            if stopping():
                save(['last.pt'])
                say(f"stopped by {signal.Signals(stop[0]).name if stop else 'another process'} at iter {iter_num}; "
                    f"saved {out_dir}/last.pt. Resume with: python gpt.py --init_from=resume --out_dir={out_dir}")
                sys.exit(128 + (stop[0] if stop else signal.SIGTERM))
            loss = train_step(step_model, optimizer, scaler, get_lr(iter_num))
            iter_num += 1
            if iter_num % log_interval == 0 or iter_num == max_iters:
                lossf = loss.item()  # the only place a training step waits for the GPU
                if not math.isfinite(lossf):
                    give_up(f"the loss is {lossf}")
                dt, pace = speed()
                say(f"iter {iter_num}/{max_iters}: loss {lossf:.4f}, lr {get_lr(iter_num - 1):.2e}, "
                    f"{dt * 1000:.0f} ms/iter, {pace}")
                if master:
                    append_log(rows, iter=iter_num, elapsed_s=round(time.time() - t_start, 2), train_loss=round(lossf, 4),
                               lr=f'{get_lr(iter_num - 1):.4g}', tokens_per_s=round(tokens_per_iter / dt))
                it_log, t_log = iter_num, time.time()
            elif master and tty and time.time() - t_shown > 0.5:  # a progress line, rewritten in place
                t_shown = time.time()
                print(f"\riter {iter_num}/{max_iters}: last loss {lossf:.4f}, {speed()[1]}", end='', flush=True)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if master:
        print(f"done: best val loss {best_val_loss:.4f}, saved in {out_dir}/ckpt.pt. A sample of the final weights:")
        print(generate_text(model, tokenizer, 500))
    if world_size > 1:
        dist.barrier()  # leave together: a process that tears down early can break the others' connections
    return best_val_loss


# -----------------------------------------------------------------------------
# Entry point: read the settings, check them and the data, train.

def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; a device that is not here is an error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == 'auto':
        return 'cuda' if cuda else 'mps' if mps else 'cpu'
    if (name.startswith('cuda') and not cuda) or (name == 'mps' and not mps):
        raise UserError(f"--device={name} is not available on this machine; use --device=cpu (or auto)")
    return name


def check_config():
    """Catch bad settings before any work starts: one line each, naming the key and the fix."""
    cfg = globals()
    for key in ('eval_interval', 'eval_iters', 'log_interval', 'batch_size', 'gradient_accumulation_steps', 'block_size',
                'n_layer', 'n_head', 'n_embd', 'max_iters', 'lr_decay_iters', 'learning_rate'):
        if not 0 < cfg[key] < math.inf:  # written so that nan fails too
            raise UserError(f"--{key} must be positive, got {cfg[key]}")
    for key in ('warmup_iters', 'min_lr', 'weight_decay', 'grad_clip'):
        if not 0 <= cfg[key] < math.inf:
            raise UserError(f"--{key} must be zero or more, got {cfg[key]}")
    for key in ('dropout', 'beta1', 'beta2'):
        if not 0 <= cfg[key] < 1:
            raise UserError(f"--{key} must be in [0, 1), got {cfg[key]}")
    if n_embd % n_head:
        raise UserError(f"--n_embd={n_embd} must be a multiple of --n_head={n_head}, e.g. "
                        f"--n_embd={max(1, round(n_embd / n_head)) * n_head}")
    if dtype == 'float16' and not device.startswith('cuda'):
        raise UserError(f"--dtype=float16 needs a CUDA GPU; on {device} use --dtype=float32 (or auto)")
    if dtype == 'bfloat16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype=bfloat16 is not supported by this GPU; use --dtype=float16 (or auto)")
    last, best = os.path.join(out_dir, 'last.pt'), os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'scratch' and (os.path.exists(last) or os.path.exists(best)):
        raise UserError(f"{out_dir}/ already holds a checkpoint; continue it with --init_from=resume, or train "
                        "into a new folder with --out_dir=NAME (delete the old one yourself if you mean to)")
    if init_from == 'resume' and not os.path.exists(last):
        raise UserError(f"--init_from=resume but there is no {last}; start with --init_from=scratch")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir={out_dir} cannot be created ({e.strerror}); pick another --out_dir") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out_dir={out_dir} is not writable; pick another --out_dir")


def check_data():
    """Make sure data_dir holds the token files, running prepare.py for the default data_dir."""
    if not os.path.isfile(os.path.join(data_dir, 'train.bin')):
        if data_dir != DEFAULTS['data_dir'] or world_size > 1:
            raise UserError(f"--data_dir={data_dir} holds no train.bin; make it with: "
                            f"python prepare.py --input=YOUR.txt --data_dir={data_dir}")
        print(f"no {data_dir}/train.bin yet: running prepare.py first")
        prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare.py')
        if subprocess.run([sys.executable, prepare, f'--data_dir={data_dir}']).returncode:
            sys.exit(1)  # prepare.py has printed what went wrong
    try:
        meta = read_meta()
        complete = (meta['train_tokens'], meta['val_tokens']) == (len(tokens('train')), len(tokens('val')))
    except (OSError, ValueError, KeyError):
        complete = False
    if not complete:
        raise UserError(f"--data_dir={data_dir} is incomplete (meta.json missing, unreadable or not matching the "
                        f"token files, e.g. after an interrupted prepare.py); run prepare.py again")
    n_val = len(tokens('val'))
    if n_val <= block_size:
        raise UserError(f"--block_size={block_size} needs more than {block_size} tokens in the val split, which "
                        f"has {n_val}; use --block_size={max(1, n_val - 1)} or less, or a longer text")


def setup(overrides):
    """Apply --key=value overrides (over a resumed run's own settings), pick the device and dtype, and
    check settings and data before any work. Returns the checkpoint to resume from, if any."""
    global device, dtype, rank, local_rank, world_size
    globals().update({**DEFAULTS, **overrides})
    ckpt = None
    if init_from == 'resume' and os.path.isfile(os.path.join(out_dir, 'last.pt')):
        ckpt = load_checkpoint(os.path.join(out_dir, 'last.pt'))
        for key in ('block_size', 'n_layer', 'n_head', 'n_embd'):
            if key in overrides and overrides[key] != ckpt['model_args'][key]:
                raise UserError(f"--{key}={overrides[key]} differs from the checkpoint's {ckpt['model_args'][key]}; "
                                "a resumed run keeps its model's shape")
        saved = {k: v for k, v in ckpt['config'].items() if k in DEFAULTS and k not in ('out_dir', 'init_from', 'device', 'dtype')}
        globals().update({**saved, **overrides})  # the run's own settings, then what was given now
    device = pick_device(device)
    if 'RANK' in os.environ:  # started by torchrun: one process per device, NCCL between GPUs, gloo between CPUs
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device.startswith('cuda') else 'float32'
    check_config()
    check_data()
    if ckpt is not None and ckpt['tokenizer'] != read_meta()['tokenizer']:
        raise UserError(f"the checkpoint in {out_dir} was trained on another vocabulary than {data_dir}/meta.json; "
                        "resume with the --data_dir it was trained on")
    if device.startswith('cuda'):
        torch.set_float32_matmul_precision('high')  # TF32 tensor cores for any float32 matmul left
    return ckpt


def main(argv):
    try:
        train(setup(parse_args(argv, DEFAULTS, __file__, CHOICES)))
    finally:
        if dist.is_initialized():  # on success and on errors alike, so no process is left waiting
            dist.destroy_process_group()


if __name__ == '__main__':
    run_cli(main)
