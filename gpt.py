"""The reference GPT, a transformer language model trained from scratch on any text, to read top to bottom:
the decoder of "Attention Is All You Need" (Vaswani et al., 2017) as GPT-2 arranged it ("Language Models
are Unsupervised Multitask Learners", 2019). `python gpt.py --n_layer=6` overrides a setting; --help: all."""
import os, signal, sys  # noqa: E401
if __name__ == '__main__':  # before the slow imports: Ctrl-C while torch loads ends in one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write('error: stopped by Ctrl-C\n'), os._exit(130)))
import collections, contextlib, difflib, io, json, math, pathlib, re, subprocess, time  # noqa: E401, E402
import numpy as np
import torch
from torch import distributed as dist, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# CONFIG. Each value can be overridden on the command line as --key=value.
out_dir = 'out'  # where checkpoints go: last.pt (to resume) and ckpt.pt (best val, to sample from)
data_dir = 'data'  # where prepare.py wrote train.bin, val.bin and meta.json
init_from = 'scratch'  # 'scratch' starts a new model, 'resume' continues the one in out_dir
eval_interval = 500  # evaluate, print a sample and save checkpoints every this many steps
eval_iters = 110  # batches of fixed windows per split at each eval (by default all of Shakespeare's val)
log_interval = 50  # print the training loss every this many steps
batch_size = 16  # how many independent sequences are trained on in parallel
gradient_accumulation_steps = 1  # micro-batches per step: a step sees batch_size x this x processes rows
block_size = 64  # the longest context the model sees, in tokens
n_layer = 4  # transformer blocks; 0 leaves a bigram model (each token predicts the next one alone)
n_head = 4  # attention heads per block
n_embd = 128  # width of the residual stream (channels per token)
dropout = 0.0  # probability of zeroing activations in training; helps long runs on small data
flash = True  # attention by the fused F.scaled_dot_product_attention; False runs Head's written-out math
learning_rate = 4e-3  # peak learning rate, reached at the end of warmup
max_iters = 2500  # how many optimizer steps to train for
warmup_iters = 50  # steps of linear warmup at the start
lr_decay_iters = 2500  # step where the cosine decay reaches min_lr (usually = max_iters)
min_lr = 4e-4  # learning rate after the decay (about learning_rate / 10)
weight_decay = 0.1  # AdamW weight decay, on weight matrices and embeddings only
beta1 = 0.9  # AdamW momentum of the gradient
beta2 = 0.99  # AdamW momentum of the squared gradient
grad_clip = 1.0  # clip the gradient norm to this value; 0 turns clipping off
device = 'auto'  # 'auto' picks cuda, then mps, then cpu
dtype = 'auto'  # 'auto' is bfloat16 on CUDA (float16 on older GPUs) and float32 elsewhere
compile = True  # torch.compile the model on CUDA (CPU runs stay eager: there it made steps slower)
seed = 1337  # seeds every random choice: same seed, same run
DEFAULTS = {k: v for k, v in globals().items() if isinstance(v, (bool, int, float, str)) and k[0] != '_'}
class UserError(Exception):  # a mistake the user can fix (a setting, a file): one line, exit code 2
    pass

# TOKENIZER: text <-> integer ids, as meta.json (and each checkpoint) says: characters, the vocabulary being
# the text's characters sorted; or byte-level BPE (prepare.py): 256 byte values, then fused frequent pairs.
class CharTokenizer:
    def __init__(self, vocab):
        self.vocab, self.vocab_size = vocab, len(vocab)  # id -> character
        self.stoi = {ch: i for i, ch in enumerate(vocab)}  # character -> id
    def encode(self, text):
        if unknown := sorted(set(text) - self.stoi.keys()):
            raise UserError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; remove them")
        return [self.stoi[ch] for ch in text]
    def decode(self, ids):
        return ''.join(self.vocab[i] for i in ids)

def merge(ids, pair, new_id):
    """Replace each occurrence of `pair` in the id array `ids`, left to right, by new_id."""
    hits = np.flatnonzero((ids[:-1] == pair[0]) & (ids[1:] == pair[1]))
    if pair[0] == pair[1]:  # in a run like 'aaaa' the pairs overlap: take the 1st, 3rd... of each run
        run_start = np.maximum.accumulate(np.where(np.diff(hits, prepend=-2) > 1, hits, 0))
        hits = hits[(hits - run_start) % 2 == 0]
    ids = ids.copy()
    ids[hits] = new_id
    return np.delete(ids, hits + 1)


class BPETokenizer:
    """Byte-level BPE: a text is its UTF-8 bytes (ids 0-255); then merge i, in the order train_bpe learned
    them, fuses each neighbouring pair (a, b) into id 256 + i. Any text encodes, in any language."""

    def __init__(self, merges):
        self.merges, self.vocab_size = [tuple(pair) for pair in merges], 256 + len(merges)
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


def load_tokenizer(meta):  # meta: the 'tokenizer' entry of meta.json
    return BPETokenizer(meta['merges']) if meta['kind'] == 'bpe' else CharTokenizer(meta['vocab'])

# DATA: prepare.py's uint16 token files, read through np.memmap (no corpus has to fit in memory). An example
# is a window x of block_size tokens and y, the same shifted one on: at each position, the token that follows.
def get_batch(split, starts=None):  # x and y, (B, block_size) each: the windows at starts, or random ones
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    if starts is None:
        starts = torch.randint(len(data) - block_size, (batch_size,)).numpy()
    rows = torch.from_numpy(data[np.asarray(starts)[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:]  # (B, T) each
    if device.startswith('cuda'):  # pinned memory: the copy to the GPU overlaps with compute
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

# MODEL: a decoder-only transformer. Each token becomes a vector (token + position embedding); n_layer blocks
# refine them with attention (a token gathers from earlier tokens) and a feed-forward net (each token on its
# own); a last linear layer turns each vector into logits, the scores of every possible next token.
GPTConfig = collections.namedtuple('GPTConfig', 'vocab_size block_size n_layer n_head n_embd dropout flash',
                       defaults=(0.0, True))

class Head(nn.Module):
    """Causal self-attention written out, for all heads at once: q, k, v are (B, nh, T, hs), the heads a
    batch dimension. This is the math that F.scaled_dot_product_attention fuses into one kernel."""
    def __init__(self, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
    def forward(self, q, k, v):
        T, S = q.shape[-2], k.shape[-2]  # S > T when a KV cache supplies the keys of earlier tokens
        # A dot product sums hs terms, so its variance grows with hs; dividing by sqrt(hs) keeps the scores
        # near unit variance, where softmax stays soft instead of saturating into a one-hot choice.
        wei = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B,nh,T,hs) @ (B,nh,hs,S) -> (B, nh, T, S)
        # The targets are the inputs shifted by one: a token that saw later ones would read its own answer.
        # So each query sees the keys up to its own position (the T queries are the last T of S tokens).
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        wei = wei.masked_fill(~mask, float('-inf')).softmax(dim=-1)  # (B, nh, T, S): each row sums to 1
        return self.dropout(wei) @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs)

class MultiHeadAttention(nn.Module):
    """n_head heads side by side, each of hs = C / nh channels, each free to look for something else."""
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.flash, self.dropout = cfg.n_head, cfg.flash, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # query, key, value of all heads at once
        self.head = Head(cfg.dropout)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)  # mixes the heads' outputs into the residual stream
        self.resid_dropout = nn.Dropout(cfg.dropout)
    def forward(self, x, cache=None):
        B, T, C = x.shape
        # One matmul gives q, k, v side by side, C channels each; in each, head h owns channels h*hs to
        # (h+1)*hs. view splits C into (nh, hs) and transpose makes the heads a batch dimension.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))  # (B, nh, T, hs) each
        if cache is not None:  # generation (sample.py): the keys and values of earlier tokens come too
            k, v = cache.append(k, v)  # (B, nh, S, hs)
        if self.flash:  # a cache is fed a window when empty (causal), else one token, which sees every key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            y = self.head(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side again
        return self.resid_dropout(self.proj(y))

class FeedForward(nn.Module):
    """A two-layer MLP applied to each position on its own, 4x wider inside."""
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)  # back into the residual stream
        self.dropout = nn.Dropout(cfg.dropout)
    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)

class Block(nn.Module):
    """Communication (attention), then computation (feed-forward), each added to the residual stream x.
    Pre-norm (GPT-2): each part reads LayerNorm(x) but adds to x, a plain sum that gradients flow straight
    through, however deep the stack. No block normalizes the sum itself, so ln_f does, before the output."""
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.n_embd), MultiHeadAttention(cfg)
        self.ln2, self.ffwd = nn.LayerNorm(cfg.n_embd), FeedForward(cfg)
    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.ffwd(self.ln2(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)  # attention by itself ignores order
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: reading and writing a token share a vector
        # GPT-2 init: weights from N(0, 0.02), and the projections that write into the residual stream
        # scaled by 1/sqrt(2 * n_layer), so that the sum of 2 * n_layer of them keeps its variance.
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith('proj') else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy loss if targets (B, T) are given.
        With sample.py's KV cache, idx holds only the tokens after the cache.length it holds."""
        past = 0 if cache is None else cache.length
        pos = torch.arange(past, past + idx.shape[1], device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):  # more ways, a KV cache: sample.py
        """Extend idx (B, T) by max_new_tokens tokens, each drawn given the last block_size tokens."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[0][:, -1].float() / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float('-inf'))
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), 1)), dim=1)  # (B, T + 1)
        return idx

# EVALUATION: the mean loss of each split over a fixed set of windows, the same ones at every eval, so evals
# are free of sampling noise and comparable across runs. With the defaults the val split is covered whole.
def autocast():  # mixed precision if dtype asks: matmuls in bfloat16 (or float16), reductions in float32
    return torch.autocast(device.split(':')[0], getattr(torch, dtype), enabled=dtype != 'float32')

@torch.no_grad()
def estimate_loss(model, meta, splits=('train', 'val')):
    model.eval()  # dropout off
    out = {}
    for split in splits:
        n = (meta[f'{split}_tokens'] - 1) // block_size  # non-overlapping windows that fit in the split
        k = min(n, eval_iters * batch_size)  # k of them, spread evenly over the split:
        starts = np.arange(k) * n // k * block_size
        total = torch.zeros((), device=device)
        for i in range(0, k, batch_size):
            x, y = get_batch(split, starts[i:i + batch_size])
            with autocast():
                total += model(x, y)[1].float() * len(x)  # the batch's mean loss, weighted by its size
        out[split] = total.item() / k
    return out  # the model stays in eval mode (the sample after it too) until train_step

# TRAINING. Under torchrun, processes train on their own batches, DistributedDataParallel (DDP) averages their
# gradients, and process 0 alone evaluates, prints and writes files. Exact resume: a checkpoint (tensors and
# plain values, read by torch.load(weights_only=True) without running code) holds the model, optimizer, loss
# scaler, step and best val loss; each step's batches and dropout come from a seed of (seed, step, process).
rank, world_size = 0, 1  # setup() sets these when torchrun starts this process

def get_lr(it):
    if it < warmup_iters:  # 1) linear warmup, starting above zero so that no step is wasted
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:  # 2) after the decay, min_lr
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 3) in between, a cosine from 1 to 0
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)

def build(vocab_size, ckpt=None):  # the model, its AdamW optimizer and loss scaler: new, or from a checkpoint
    torch.manual_seed(seed)  # the same initial weights in every process
    model = GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, flash)).to(device)
    groups = [{'params': [p for p in model.parameters() if p.dim() >= 2]},  # weight decay on matrices only
              {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, learning_rate, (beta1, beta2), weight_decay=weight_decay,
                                  fused=device.split(':')[0] in ('cuda', 'cpu'))  # one kernel for all
    scaler = torch.amp.GradScaler(enabled=dtype == 'float16')  # float16 needs loss scaling; bfloat16 not
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        if scaler.is_enabled() and ckpt['scaler']:  # a float16 run; a bfloat16 one saved no scale
            scaler.load_state_dict(ckpt['scaler'])
    return model, optimizer, scaler

def train_step(model, optimizer, scaler, it):  # -> the mean loss, a tensor: reading it waits for the GPU
    """Step `it` on gradient_accumulation_steps fresh batches; DDP averages the gradients once, at the end."""
    model.train()  # dropout on (estimate_loss turned it off)
    torch.manual_seed(hash((seed, it, rank)))  # this step's batches and dropout masks: see "Exact resume"
    for group in optimizer.param_groups:
        group['lr'] = get_lr(it)
    total = 0.0
    for micro in range(gradient_accumulation_steps):
        x, y = get_batch('train')
        last = micro == gradient_accumulation_steps - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext(), autocast():
            loss = model(x, y)[1] / gradient_accumulation_steps  # so that the gradients sum to the mean's
        scaler.scale(loss).backward()
        total += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total

def load_model(path, device='cpu'):  # a checkpoint, or an out_dir holding ckpt.pt -> (model, tokenizer)
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train a model first: python gpt.py")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model = GPT(GPTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt['model'])  # do the weights fit the shape?
        return model.to(device).eval(), load_tokenizer(ckpt['tokenizer'])
    except Exception as e:  # a pickled object, a truncated file, another kind of file, a hand edit...
        why = 'pickled Python objects, which could run code on load' if 'Unsupported global' in str(e) else \
            f"no whole gpt.py checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:80]}...)"
        raise UserError(f"{path} holds {why}; refusing it, pick another file") from None

def train(ckpt, meta):  # the training loop; ckpt is the checkpoint that a resumed run continues (or None)
    tokenizer = load_tokenizer(meta['tokenizer'])
    model, optimizer, scaler = build(tokenizer.vocab_size, ckpt)
    step_model = torch.compile(model) if compile and device.startswith('cuda') else model  # fused kernels
    step_model = DDP(step_model) if world_size > 1 else step_model  # it averages gradients over processes
    it, best_val = (ckpt['iter_num'], ckpt['best_val_loss']) if ckpt else (0, math.inf)
    start_it, t_log, it_log, master, stop = it, time.time(), it, rank == 0, []  # stop: signals received
    tokens_per_it = batch_size * block_size * gradient_accumulation_steps * world_size
    log_path = os.path.join(out_dir, 'log.csv')  # a new run starts it, a resumed run appends to it
    if master:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} in {dtype}, "
              f"{tokens_per_it:,} tokens per step, {f'resuming at iter {it}' if ckpt else 'from scratch'}")
    if master and not ckpt:
        if os.path.exists(log_path):
            print(f"note: {log_path}, left by a run that saved no checkpoint, starts afresh")
        pathlib.Path(log_path).write_text('iter,train_loss,val_loss,val_bpc,lr,tokens_per_s\n')

    def log(line, *row):  # a line on the screen, and a row in log.csv
        print(line)
        with open(log_path, 'a') as f:
            f.write(','.join(map(str, row)) + '\n')
    def save(names):  # atomic, ckpt.pt first: after a crash at any moment the run resumes from a whole one
        buffer = io.BytesIO()  # serialized in memory first, so that a full disk raises an OSError saying so
        torch.save({'model': model.state_dict(), 'scaler': scaler.state_dict(), 'best_val_loss': best_val,
                    'optimizer': optimizer.state_dict(), 'iter_num': it, 'model_args': model.config._asdict(),
                    'tokenizer': meta['tokenizer'], 'config': {k: globals()[k] for k in DEFAULTS}}, buffer)
        for path in (os.path.join(out_dir, name) for name in names):
            try:
                with open(path + '.tmp', 'wb') as f:
                    f.write(buffer.getbuffer())
                    os.fsync(f.fileno())  # on the disk before the rename makes it the checkpoint
                os.replace(path + '.tmp', path)
            finally:
                with contextlib.suppress(OSError):  # after a failed write, no .tmp stays behind
                    os.remove(path + '.tmp')
    def check(loss):  # a loss of nan or inf ends the run before it can overwrite a checkpoint
        if not math.isfinite(loss):
            sys.exit(f"error: the loss is {loss} at iter {it}: training diverged; lower --learning_rate (now "
                     f"{learning_rate}) or raise --warmup_iters; the checkpoints in {out_dir}/ are kept")

    handlers = {s: signal.signal(s, lambda sig, _: stop.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if master and (it % eval_interval == 0 or it == max_iters) and (it > start_it or not ckpt):
                train_loss, val_loss = estimate_loss(model, meta).values()
                check(val_loss)
                bpc = val_loss * meta['val_tokens'] / meta['val_chars'] / math.log(2)  # for any tokenizer
                log(f"iter {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, {bpc:.4f} bits/char",
                    it, f'{train_loss:.4f}', f'{val_loss:.4f}', f'{bpc:.4f}', f'{get_lr(it):.4g}', '')
                torch.manual_seed(seed)  # the same seed at every eval: watch the same text improve
                out = model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), 100)
                print(tokenizer.decode(out[0, 1:].tolist()).strip())
                best_val, improved = min(best_val, val_loss), val_loss < best_val
                save(['ckpt.pt', 'last.pt'] if improved else ['last.pt'])
                t_log, it_log = time.time(), it  # the eval does not count in the training speed
            if it >= max_iters:
                break
            if stop and world_size == 1 or world_size > 1 and it % log_interval == 0:  # a signal: stop here?
                asked = torch.tensor(stop[0] if stop else 0, device=device)
                if world_size > 1:  # under DDP, all processes stop at the same step
                    dist.all_reduce(asked, op=dist.ReduceOp.MAX)
                if asked.item():
                    if master:
                        save(['last.pt'])
                        print(f"stopped by {signal.Signals(asked.item()).name} at iter {it}; saved last.pt. "
                              f"Resume with: python gpt.py --init_from=resume --out_dir={out_dir}")
                    sys.exit(128 + asked.item())
            loss = train_step(step_model, optimizer, scaler, it)
            it += 1
            if it % log_interval == 0 or it == max_iters:
                lossf, dt = loss.item(), (time.time() - t_log) / (it - it_log)  # .item() waits for the GPU
                check(lossf)
                if master:
                    log(f"iter {it}/{max_iters}: loss {lossf:.4f}, {dt * 1000:.0f} ms/iter, "
                        f"{tokens_per_it / dt:,.0f} tok/s, ETA {(max_iters - it) * dt / 60:.1f} min",
                        it, f'{lossf:.4f}', '', '', f'{get_lr(it - 1):.4g}', round(tokens_per_it / dt))
                t_log, it_log = time.time(), it
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)

def checked_meta(data_dir, block_size, make=False):
    """data_dir's meta.json, once it and the token files are checked: whatever was read back from disk is
    untrusted (a hand edit, two runs of prepare.py mixed...). make: prepare the data first if it is missing."""
    if not os.path.isfile(os.path.join(data_dir, 'train.bin')):
        if not make:
            raise UserError(f"--data_dir={data_dir} holds no train.bin; make it with: "
                            f"python prepare.py --input=YOUR.txt --data_dir={data_dir}")
        print(f"no {data_dir}/train.bin yet: running prepare.py first", flush=True)
        done = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare.py'),
                               f'--data_dir={data_dir}'])
        if done.returncode:
            sys.exit(done.returncode)
    try:
        with open(os.path.join(data_dir, 'meta.json'), encoding='utf-8') as f:
            meta = json.load(f)
        data = {split: np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
                for split in ('train', 'val')}
        vocab_size = load_tokenizer(meta['tokenizer']).vocab_size
        fits = all(len(d) == meta[f'{s}_tokens'] and meta[f'{s}_chars'] > 0 for s, d in data.items())
        fits = fits and all(d[::len(d) // 10**6 + 1].max() < vocab_size for d in data.values())  # ids: a sample
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        fits = False
    if not fits:
        raise UserError(f"--data_dir={data_dir} is incomplete or inconsistent (meta.json missing, unreadable or not "
                        "matching the token files, e.g. after an interrupted or hand-edited prepare); run prepare.py again")
    if len(data['val']) <= block_size:
        raise UserError(f"--block_size={block_size} needs more than {block_size} tokens in the val split, which has "
                        f"{len(data['val'])}; use --block_size={max(1, len(data['val']) - 1)} or less")
    return meta

# ENTRY POINT: read the settings from the command line, check them and the data, train.
def parse_args(argv, defaults, source):  # --key=value overrides, typed as the defaults (true/false for bools)
    if {'-h', '--help'} & set(argv):  # each key with its default and its comment in the source file
        notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", pathlib.Path(source).read_text('utf-8'), re.M))
        sys.exit(print('\n'.join(f"--{f'{k}={v!r}':<33} {notes.get(k, '')}" for k, v in defaults.items())))
    given = {}
    for arg in argv:
        key, eq, value = arg.removeprefix('--').partition('=')
        if key not in defaults or not arg.startswith('--') or not eq:
            close = [f'did you mean --{c}?' for c in difflib.get_close_matches(key, defaults, n=1)]
            raise UserError(f"unknown setting {arg}; {(close or ['see --help'])[0]}")
        kind = type(defaults[key])
        try:
            given[key] = {'true': True, 'false': False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise UserError(f"--{key}={value}: expected {'true or false' if kind is bool else kind.__name__}")
    return given

def pick_device(name):  # 'auto' -> cuda, else mps, else cpu; a device this machine lacks is an error
    here = {'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available(), 'cpu': True,
            **{f'cuda:{i}': True for i in range(torch.cuda.device_count())}}
    if not here.get(name, name == 'auto'):
        raise UserError(f"--device={name} is not available on this machine; use --device=cpu (or auto)")
    return next(d for d in here if here[d]) if name == 'auto' else name

def setup(overrides):  # settings, device and data, all checked before any work; -> (checkpoint or None, meta)
    global device, dtype, rank, world_size
    globals().update({**DEFAULTS, **overrides})
    found = [p for p in (f'{out_dir}/last.pt', f'{out_dir}/ckpt.pt') if os.path.isfile(p)]
    resume = found and init_from == 'resume' and load_model(found[0])  # last.pt; ckpt.pt if no last.pt yet
    ckpt = torch.load(found[0], map_location='cpu', weights_only=True) if resume else None
    if ckpt:  # the run's own settings, then those given now
        saved = {k: v for k, v in ckpt['config'].items() if k not in ('out_dir', 'device', 'dtype')}
        globals().update({**saved, **overrides})
    device = pick_device(device)
    if 'RANK' in os.environ:  # started by torchrun: a process per device; NCCL joins GPUs, gloo CPUs
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
        device = f'cuda:{local_rank}' if device.startswith('cuda') else device
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    cuda, g, kept = device.startswith('cuda'), globals(), ckpt['config'] if ckpt else {}
    if dtype == 'auto':  # bfloat16 where the GPU has it; on most CPUs it is many times slower
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if cuda else 'float32'
    rules = [(0 < g[k] < math.inf, f'--{k}={g[k]} must be positive') for k in ('eval_interval', 'eval_iters',
             'log_interval', 'batch_size', 'gradient_accumulation_steps', 'block_size', 'n_head', 'n_embd',
             'max_iters', 'lr_decay_iters', 'learning_rate')]  # written so that nan fails too
    rules += [(0 <= g[k] < 2 ** 63, f'--{k}={g[k]} must be zero or more')
              for k in ('n_layer', 'warmup_iters', 'min_lr', 'weight_decay', 'grad_clip', 'seed')]
    rules += [(0 <= g[k] < 1, f'--{k}={g[k]} must be in [0, 1)') for k in ('dropout', 'beta1', 'beta2')]
    rules += [(kept.get(k, g[k]) == g[k], f"--{k}={g[k]}, but a resumed run keeps its {kept.get(k)}")
              for k in ('block_size', 'n_layer', 'n_head', 'n_embd', 'weight_decay', 'beta1', 'beta2')]
    rules += [(n_head < 1 or n_embd % n_head == 0, f'--n_embd={n_embd} must be a multiple of --n_head'),
              (init_from in ('scratch', 'resume'), f'--init_from={init_from} must be scratch or resume'),
              (dtype in ('float32', 'bfloat16', 'float16'), f'--dtype={dtype} must be auto, float32, bfloat16'
               ' or float16'),
              (dtype != 'float16' or cuda, '--dtype=float16 needs a CUDA GPU; use --dtype=float32 or auto'),
              (init_from == 'resume' or not found, f'{out_dir}/ already holds a checkpoint; continue it with '
               '--init_from=resume, or train into a new folder with --out_dir=NAME'),
              (init_from == 'scratch' or found, f'{out_dir}/ holds no checkpoint; use --init_from=scratch')]
    for ok, message in rules:
        if not ok:
            raise UserError(message)
    os.makedirs(out_dir, exist_ok=True)
    meta = checked_meta(data_dir, block_size, make=data_dir == 'data' and world_size == 1)
    if ckpt and ckpt['tokenizer'] != meta['tokenizer']:
        raise UserError(f'{out_dir}/ was trained on another vocabulary; resume it with its own --data_dir')
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 tensor cores for any float32 matmul left
    return ckpt, meta

def main(argv):
    overrides = parse_args(argv, DEFAULTS, __file__)
    try:
        train(*setup(overrides))
    except OSError as e:  # a full disk, a folder turned read-only...: the checkpoints are whole, old or new
        raise UserError(f"cannot write to {out_dir}/ ({e.strerror}); its checkpoints are kept; once that is "
                        f"fixed, resume: python gpt.py --init_from=resume --out_dir={out_dir}") from None
    finally:
        if dist.is_initialized():  # on success and on errors alike; leave together: a process that tears down
            dist.barrier()  # early can break the others' connections
            dist.destroy_process_group()

def run_cli(main, argv=None):  # a UserError or Ctrl-C ends a script with one line on stderr, no traceback
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UserError, KeyboardInterrupt) as e:
        print(f"error: {e or 'stopped by Ctrl-C'}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 130)

if __name__ == '__main__':
    run_cli(main)
