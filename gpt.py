"""The reference GPT, a transformer trained from scratch on any text. Read top to bottom: the lesson first."""
import os, signal, sys  # noqa: E401
if __name__ == '__main__':  # before the slow imports: Ctrl-C while torch loads ends in one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write('error: stopped by Ctrl-C\n'), os._exit(130)))
import collections, contextlib, difflib, fcntl, gc, io, json, math, pathlib, re, subprocess, time  # noqa
import numpy as np
import torch
from torch import distributed as dist, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# CONFIG. Every setting is a global with its meaning; --key=value on the command line overrides it.
# The model's shape
n_layer = 4  # how many transformer blocks are stacked; 0: each prediction sees only its token and position
n_head = 4  # how many attention heads run side by side in each block
n_embd = 128  # channels per token: the vector (the 'residual stream') that every block adds to
block_size = 64  # how many tokens of context, at most, the model sees to predict the next one
dropout = 0.0  # what fraction of activations is zeroed in training; helps long runs on small data
# The optimization
batch_size = 16  # how many independent sequences are trained on in parallel
learning_rate = 4e-3  # the peak learning rate, reached at the end of warmup
max_iters = 2500  # how many optimizer steps to train for
warmup_iters = 50  # how many steps the learning rate ramps up over at the start
lr_decay_iters = 2500  # the step where the cosine decay reaches min_lr (usually = max_iters)
min_lr = 4e-4  # the learning rate after the decay (about learning_rate / 10)
weight_decay = 0.1  # how strongly AdamW pulls weight matrices and embeddings towards zero
beta1 = 0.9  # AdamW's momentum: how much of the past gradients each step keeps
beta2 = 0.99  # AdamW's memory of squared gradients, which sets each weight's own step size
grad_clip = 1.0  # the largest gradient norm a step may take (larger ones are scaled down); 0 turns it off
gradient_accumulation_steps = 1  # micro-batches per step: a step sees batch_size x this x processes rows
# Watching the run
eval_interval = 500  # every this many steps: evaluate, print a sample and save checkpoints
eval_iters = 110  # batches of fixed windows per split at each eval (by default all of Shakespeare's val)
log_interval = 50  # print the training loss every this many steps
# The system: files, device and speed (safe to skip on a first read)
out_dir = 'out'  # where checkpoints go: last.pt (to resume) and ckpt.pt (best val, to sample from)
data_dir = 'data'  # where prepare.py wrote train.bin, val.bin and meta.json
init_from = 'scratch'  # 'scratch' starts a new model, 'resume' continues the one in out_dir
device = 'auto'  # 'auto' picks cuda, then mps, then cpu
dtype = 'auto'  # 'auto' is bfloat16 on GPUs that have it natively (float16 on older ones), else float32
compile = True  # torch.compile each block on CUDA (CPU runs stay eager: there it made steps slower)
flash = True  # attention by the fused F.scaled_dot_product_attention; False runs the written-out math
seed = 1337  # seeds every random choice: same seed, same run
# On CUDA, what you do not set comes from here: the reference model (10.8M), trained to its best val loss.
GPU_RECIPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                  learning_rate=1e-3, max_iters=2000, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
                  eval_interval=250, eval_iters=7)
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and isinstance(v, (bool, int, float, str))}

# TOKENIZER: text <-> ids: one id per character of the text's sorted vocabulary, or byte-level BPE (as GPT-2).
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
class BPETokenizer:  # ids 0-255: the bytes; id 256 + i: the pair that prepare.py's merge i fused
    def __init__(self, merges):
        self.merges, self.vocab_size = [tuple(pair) for pair in merges], 256 + len(merges)
        self.bytes = [bytes([i]) for i in range(256)]  # id -> the bytes it stands for
        for a, b in self.merges:
            self.bytes.append(self.bytes[a] + self.bytes[b])
    def encode(self, text):  # bytes -> a character each (latin-1: chr(b) is byte b): ids and characters agree
        s = text.encode('utf-8').decode('latin-1')  # then merge i, in order, makes its pair chr(256 + i)
        for i, (a, b) in enumerate(self.merges):
            s = s.replace(chr(a) + chr(b), chr(256 + i))
        return [ord(c) for c in s]
    def decode(self, ids):  # a cut through a multi-byte character decodes as U+FFFD instead of failing
        return b''.join(self.bytes[i] for i in ids).decode('utf-8', errors='replace')
def load_tokenizer(meta):  # meta: the 'tokenizer' entry of meta.json (or of a checkpoint)
    return BPETokenizer(meta['merges']) if meta['kind'] == 'bpe' else CharTokenizer(meta['vocab'])

# DATA: prepare.py's uint16 token files, read through np.memmap (no corpus has to fit in memory).
def get_batch(split, starts=None):  # x, y (B, T) each (B: batch_size, T: block_size), at starts or random
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')
    if starts is None:
        starts = torch.randint(len(data) - block_size, (batch_size,)).numpy()  # start + T: a row's end
    # A row: the T + 1 tokens at start + 0..T ((B, T + 1) indices); x its first T, y its last T. It teaches T
    # predictions at once: y[t], the token after x[0..t], for each t (the causal mask sees to that).
    rows = torch.from_numpy(data[np.asarray(starts)[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device.startswith('cuda'):  # page-locked memory: the copy to the GPU runs while it computes
        rows = rows.pin_memory()
    rows = rows.to(device, non_blocking=True)  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]

# MODEL: each token becomes a vector (token + position embedding); blocks refine them with attention (a token
# gathers from earlier ones) and a feed-forward net; a last layer turns each into logits, next-token scores.
GPTConfig = collections.namedtuple('GPTConfig', 'vocab_size block_size n_layer n_head n_embd dropout flash',
                                   defaults=(0.0, True))
class MultiHeadAttention(nn.Module):  # n_head heads of hs = C / nh channels, each learns its own pattern
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # query, key, value of all heads at once
        self.heads = Head(cfg.dropout, cfg.flash)  # one module runs all n_head heads at once
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)  # mixes the heads' outputs into the residual stream
        self.resid_dropout = nn.Dropout(cfg.dropout)
    def forward(self, x, cache=None):
        B, T, C = x.shape
        # 1) One matmul gives q, k, v side by side, C channels each; in each, head h owns channels h*hs to
        # (h+1)*hs. view cuts C into (nh, hs) and transpose makes the heads a batch dimension.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))  # (B, nh, T, hs) each
        mask = None  # None means the plain causal mask: token t sees tokens 0..t (Head builds it)
        if cache is not None:  # generation only (sample.py): the keys and values of earlier tokens join
            k, v, mask = cache.append(k, v)  # (B, nh, S, hs), S: cached + new; mask (T, S)
        y = self.heads(q, k, v, mask)  # 2) every head attends (Head, next): (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # 3) (B, T, C) again; view needs contiguous memory
        return self.resid_dropout(self.proj(y))
class Head(nn.Module):
    """What one head computes from its queries, keys and values (T, hs). Written over the last two dimensions,
    the same lines run every head of every sequence at once: q, k, v come as (B, nh, T, hs)."""
    def __init__(self, dropout, flash=True):
        super().__init__()
        self.flash, self.dropout = flash, nn.Dropout(dropout)
    def forward(self, q, k, v, mask=None):
        if not self.flash:  # written out: the lesson
            # A score per (query, key): how much the query's token wants the key's. A dot product of hs terms
            # has a variance that grows with hs; / sqrt(hs) keeps it near 1: softmax stays soft, not one-hot.
            wei = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B,nh,T,hs) @ (B,nh,hs,S) -> (B,nh,T,S)
            # Targets are the inputs shifted by one: a token that saw later ones would read its answer.
            mask = torch.ones_like(wei[0, 0], dtype=torch.bool).tril() if mask is None else mask  # (T, S)
            wei = wei.masked_fill(~mask, float('-inf')).softmax(dim=-1)  # row t: keys 0..t; exp(-inf) = 0
            return self.dropout(wei) @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs): a weighted mean
        # The same, fused into one kernel (flash attention) that can skip storing the scores; a test proves it
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=self.dropout.p if self.training else 0.0)
class FeedForward(nn.Module):  # a two-layer MLP applied to each position on its own, 4x wider inside
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)  # back into the residual stream
        self.dropout = nn.Dropout(cfg.dropout)
    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
class Block(nn.Module):
    """Communication (attention), then computation (feed-forward), each added to the residual stream x.
    Pre-norm (GPT-2; the first transformer normalized after the sum): each part reads LayerNorm(x) but adds
    to x: a sum gradients flow straight through, however deep. No block normalizes the sum, so ln_f does."""
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
        self.ln_f = nn.LayerNorm(config.n_embd)  # normalizes the residual sum once, at the end (see Block)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: reading and writing a token share a vector
        # GPT-2 init: N(0, 0.02); the 2 .proj per block, writing into the residual stream, / sqrt(2 * n_layer)
        for name, module in self.named_modules():  # so that the sum's variance does not grow with depth
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith('.proj') else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    def forward(self, idx, targets=None, cache=None):  # idx (B, T) -> logits (B, T, V), the loss if targets
        pos = torch.arange(idx.shape[1], device=idx.device) + (0 if cache is None else cache.length)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        # The loss: -log(probability of the true next token), averaged over the B * T positions (as B*T rows)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):  # more, and a KV cache: sample.py
        for _ in range(max_new_tokens):  # each token drawn given the last block_size; temperature 0: argmax
            logits = self(idx[:, -self.config.block_size:])[0][:, -1].float()  # (B, V): the next token's
            logits = logits - logits.amax(dim=-1, keepdim=True)  # max now 0: no overflow; == 0 is argmax
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float('-inf'))
            probs = F.softmax(logits / temperature, dim=-1) if temperature > 0 else (logits == 0).float()
            idx = torch.cat((idx, torch.multinomial(probs, 1)), dim=1)  # (B, T + 1)
        return idx

# EVALUATION: the mean loss of each split over fixed windows, the same at every eval: no sampling noise.
def autocast():  # mixed precision if dtype asks: matmuls in bfloat16 (or float16), reductions in float32
    return torch.autocast(device.split(':')[0], getattr(torch, dtype), enabled=dtype != 'float32')
@torch.no_grad()
def estimate_loss(model, meta, splits=('train', 'val')):
    model.eval()  # dropout off: the loss of the model itself, not of a randomly thinned copy
    out = {}
    for split in splits:
        n = (meta[f'{split}_tokens'] - 1) // block_size  # windows at multiples of T (each needs T + 1)
        k = min(n, eval_iters * batch_size)  # k of them, spread evenly: window i starts at block i * n // k
        starts = np.arange(k) * n // k * block_size  # (with the defaults, Shakespeare's val split whole)
        total = torch.zeros((), device=device)
        for i in range(0, k, batch_size):
            x, y = get_batch(split, starts[i:i + batch_size])
            with autocast():
                total += model(x, y)[1].float() * len(x)  # the batch's mean loss, weighted by its size
        out[split] = total.item() / k
    return out  # the model stays in eval mode (the sample after it too) until train_step

# TRAINING: the learning-rate schedule, the optimizer, one step, and the loop that repeats it.
def get_lr(it):
    if it < warmup_iters:  # 1) warmup: AdamW's step sizes rest on few gradients yet: full steps diverge
        return learning_rate * (it + 1) / (warmup_iters + 1)  # + 1: step 0 moves too
    if it >= lr_decay_iters:  # 2) after the decay, min_lr
        return min_lr
    # 3) In between, a cosine down to min_lr: big steps while the loss falls fast, then small ones: it settles
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> learning_rate, 1 -> min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
def build(vocab_size, ckpt=None):  # the model, its AdamW optimizer and loss scaler: new, or as ckpt left them
    torch.manual_seed(seed)  # the same initial weights in every process
    model = GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, flash)).to(device)
    # Weight decay (against overfitting) on matrices and embeddings (dim >= 2) only, not on biases and
    groups = [{'params': [p for p in model.parameters() if p.dim() >= 2]},  # LayerNorm gains (shift, scale)
              {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, learning_rate, (beta1, beta2), weight_decay=weight_decay,
                                  fused=device.split(':')[0] in ('cuda', 'cpu'))  # one kernel for all
    scaler = torch.amp.GradScaler(enabled=dtype == 'float16')  # float16 only: small gradients would underflow
    if ckpt:  # Exact resume: a checkpoint holds all the state training changes: these three, and the step,
        # the best val loss and the settings (SafetyNet.save, below). Random draws come from a seed per step
        # (train_step), so none is saved: the resumed run is bit for bit the run that never stopped (on the
        # CPU; GPU kernels may sum in any order).
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])  # AdamW's moments: without them, the steps would differ
        scaler.load_state_dict(ckpt['scaler'] or scaler.state_dict())  # a bfloat16 run saved no scale
    for block in model.blocks if compile else []:  # CUDA: fused kernels, compiled once for all the identical
        block.compile()  # blocks: far quicker than compiling the whole model
    return model, optimizer, scaler
def train_step(model, optimizer, scaler, it):  # -> the mean loss, a tensor: reading it waits for the GPU
    model.train()  # dropout on (estimate_loss turned it off)
    torch.manual_seed(hash((seed, it, rank)))  # from (seed, step, process): after a resume, the same batches
    for group in optimizer.param_groups:
        group['lr'] = get_lr(it)
    total = 0.0
    for micro in range(gradient_accumulation_steps):  # N micro-batches: the gradients of N batches add up
        x, y = get_batch('train')
        if isinstance(model, DDP):  # under torchrun, average the gradients over processes once, at the end
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with autocast():
            loss = model(x, y)[1] / gradient_accumulation_steps  # N summed: the gradient of the mean loss
        scaler.scale(loss).backward()  # the gradient of the loss with respect to every parameter
        total += loss.detach()
    if grad_clip > 0:  # one unlucky batch cannot throw the weights far: the gradient's norm is capped
        scaler.unscale_(optimizer)  # undo the loss scaling first: the cap is on the true gradient
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # AdamW moves each weight against its gradient
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total
def train(ckpt, meta):  # the training loop; ckpt: the checkpoint that a resumed run continues, or None
    model, optimizer, scaler = build(meta['vocab_size'], ckpt)
    step_model = DDP(model) if world_size > 1 else model  # DDP averages the gradients of all processes
    with SafetyNet(model, optimizer, scaler, meta, ckpt) as run:  # checkpoints, logs, stops: see below
        for it in range(run.start, max_iters + 1):  # it: steps done; at max_iters: a last eval, save
            if it % eval_interval == 0 or it == max_iters:
                run.evaluate_and_save(it)  # train and val loss, a sample, ckpt.pt and last.pt
            if it == max_iters:
                break
            run.stop_if_asked(it)  # Ctrl-C or SIGTERM: save last.pt and exit
            loss = train_step(step_model, optimizer, scaler, it)
            if (it + 1) % log_interval == 0 or it + 1 == max_iters:
                run.log_step(it + 1, loss)

# THE SAFETY NET (skip on a first read): what makes a run safe to stop, resume and spread over processes.
# Checkpoints are written whole or not at all. Under torchrun, process 0 alone prints and writes files; all
# processes agree at each eval and log step (same weights), so that a stop, a nan or an error ends them all.
rank, world_size = 0, 1  # setup() sets these when torchrun starts this process
class UserError(Exception):  # a mistake the user can fix (a setting, a file): one line, exit code 2
    pass
def agree(value, op=dist.ReduceOp.SUM):  # a number summed (or maxed) over all processes: all act alike
    if world_size > 1:
        dist.all_reduce(value := torch.tensor(float(value), device=device), op)
    return float(value)
class SafetyNet:  # for train(): checkpoints, log lines and log.csv, signals, the agreement of processes
    def __init__(self, model, optimizer, scaler, meta, ckpt):
        self.model, self.optimizer, self.scaler, self.meta, self.ckpt = model, optimizer, scaler, meta, ckpt
        self.start, self.best_val = (ckpt['iter_num'], ckpt['best_val_loss']) if ckpt else (0, math.inf)
        self.stop, self.t_log, self.it_log, self.log_path = [], time.time(), self.start, f'{out_dir}/log.csv'
        self.tokens_per_it = batch_size * block_size * gradient_accumulation_steps * world_size
    def __enter__(self):
        if rank == 0:  # out_dir's lock: one run at a time; the OS frees it as the process ends, crash or not
            os.makedirs(out_dir, exist_ok=True)
            self.lock = open(f'{out_dir}/lock', 'w')
            try:
                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.lock.close()
                raise UserError(f'{out_dir}/ is in use by another run; wait, or use --out_dir=NAME') from None
            recipe = 'its own settings' if self.ckpt else 'the gpu recipe' if 'cuda' in device else 'defaults'
            print(f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters on {device} in "
                  f"{dtype}, {recipe}, {self.tokens_per_it:,} tokens per step, "
                  f"{f'resuming at iter {self.start}' if self.ckpt else 'from scratch'}")
        if rank == 0 and not self.ckpt:  # a new run starts log.csv, a resumed run appends to it
            if os.path.exists(self.log_path):
                print(f"note: {self.log_path}, left by a run that saved no checkpoint, starts afresh")
            pathlib.Path(self.log_path).write_text('iter,train_loss,val_loss,val_bpc,lr,tokens_per_s\n')
        self.handlers = {s: signal.signal(s, lambda sig, _: self.stop.append(sig)) for s in (2, 15)}
        return self
    def __exit__(self, *_):
        for s, handler in self.handlers.items():
            signal.signal(s, handler)
        getattr(self, 'lock', io.StringIO()).close()
    def log(self, it, loss, line, *row):  # a line and a log.csv row; a loss of nan or inf ends the run first,
        if not math.isfinite(loss):  # before it can overwrite a checkpoint
            sys.exit(1 if rank else f"error: the loss is {loss} at iter {it}: training diverged; lower "
                     f"--learning_rate (now {learning_rate}) or raise --warmup_iters; checkpoints are kept")
        if rank == 0:
            print(line)
            with open(self.log_path, 'a') as f:
                f.write(','.join(map(str, (it, *row))) + '\n')
    def evaluate_and_save(self, it):  # every process evaluates: same weights, same windows, same verdict
        if it == self.start and self.ckpt:
            return  # evaluated before it was saved
        with torch.compiler.set_stance('force_eager'):  # compiled for the training shapes only
            train, val = estimate_loss(self.model, self.meta).values()
            torch.manual_seed(seed)  # the same seed at every eval: watch the same text improve
            out = self.model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), 100)[0, 1:]
        bpc = val * self.meta['val_tokens'] / self.meta['val_chars'] / math.log(2)  # README: bits per char
        text = load_tokenizer(self.meta['tokenizer']).decode(out.tolist()).strip()
        self.log(it, val, f"iter {it}: train loss {train:.4f}, val loss {val:.4f}, {bpc:.4f} bits/char\n"
                 + text,
                 f'{train:.4f}', f'{val:.4f}', f'{bpc:.4f}', f'{get_lr(it):.4g}', '')
        improved, self.best_val = val < self.best_val, min(self.best_val, val)
        self.save(it, ['ckpt.pt', 'last.pt'] if improved else ['last.pt'])  # ckpt.pt: the best val loss
        self.t_log, self.it_log = time.time(), it  # the eval does not count in the training speed
    def stop_if_asked(self, it):  # after a signal: save last.pt, exit; under torchrun agreed at log steps
        if world_size > 1 and it % log_interval == 0 or world_size == 1 and self.stop:
            if asked := int(agree(self.stop[0] if self.stop else 0, dist.ReduceOp.MAX)):
                self.save(it, ['last.pt'])
                if rank == 0:
                    print(f"stopped by {signal.Signals(asked).name} at iter {it}; saved last.pt. Resume "
                          f"with: python gpt.py --init_from=resume --out_dir={out_dir}")
                sys.exit(128 + asked)
    def log_step(self, it, loss):
        loss, dt = agree(loss.item()) / world_size, (time.time() - self.t_log) / (it - self.it_log)
        self.log(it, loss, f"iter {it}/{max_iters}: loss {loss:.4f}, {dt * 1000:.0f} ms/iter, "
                 f"{self.tokens_per_it / dt:,.0f} tok/s, ETA {(max_iters - it) * dt / 60:.1f} min",
                 f'{loss:.4f}', '', '', f'{get_lr(it - 1):.4g}', round(self.tokens_per_it / dt))
        self.t_log, self.it_log = time.time(), it
    def save(self, it, names):  # atomic, ckpt.pt first: after a crash at any moment the run resumes from one
        error, buffer = None, io.BytesIO()  # serialized in memory first: a full disk then raises an OSError
        torch.save({'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                    'scaler': self.scaler.state_dict(), 'best_val_loss': self.best_val, 'iter_num': it,
                    'tokenizer': self.meta['tokenizer'], 'model_args': self.model.config._asdict(),
                    'config': {k: globals()[k] for k in DEFAULTS}}, buffer)
        for path in (f'{out_dir}/{name}' for name in names if rank == 0 and not error):
            try:
                with open(path + '.tmp', 'wb') as f:
                    f.write(buffer.getbuffer())
                    os.fsync(f.fileno())  # on the disk before the rename makes it the checkpoint
                os.replace(path + '.tmp', path)
            except OSError as e:  # no .tmp stays behind, and under torchrun the others hear of it
                error = e
                with contextlib.suppress(OSError):
                    os.remove(path + '.tmp')
        if agree(error is not None):
            raise error or SystemExit(1)  # process 0 says why
def load_model(path, device='cpu', keys=()):  # a checkpoint, or an out_dir's ckpt.pt -> (model, tokenizer)
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train a model first: python gpt.py")
    try:  # read as untrusted, all of it. keys: what resuming needs besides; then the checkpoint comes back
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model, tokenizer = GPT(GPTConfig(**ckpt['model_args'])), load_tokenizer(ckpt['tokenizer'])
        model.load_state_dict(ckpt['model'])  # do the weights fit the shape?
        tokenizer.decode(range(tokenizer.vocab_size)), [ckpt[k] for k in keys]  # fail here, not later
    except Exception as e:  # a pickled object, a truncated file, another kind of file, a hand edit...
        why = 'pickled Python objects, which could run code on load' if 'Unsupported global' in str(e) else \
            f"no whole gpt.py checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:80]}...)"
        raise UserError(f"{path} holds {why}; refusing it, pick another file") from None
    return ckpt if keys else (model.to(device).eval(), tokenizer)
def read_data():  # meta.json, once it and the token files are checked: all read back as untrusted
    if not os.path.isfile(f'{data_dir}/train.bin') and (data_dir != 'data' or world_size > 1):
        raise UserError(f"--data_dir={data_dir} holds no train.bin; make it: python prepare.py "
                        f"--data_dir={data_dir}")
    if not os.path.isfile(f'{data_dir}/train.bin'):
        print(f"no {data_dir}/train.bin yet: running prepare.py first", flush=True)
        if code := subprocess.run([sys.executable, pathlib.Path(__file__).parent / 'prepare.py']).returncode:
            sys.exit(code)  # prepare.py said why
    try:
        meta = json.loads(pathlib.Path(data_dir, 'meta.json').read_text('utf-8'))
        splits = ('train', 'val')
        data = [np.memmap(f'{data_dir}/{s}.bin', dtype=np.uint16, mode='r') for s in splits]
        fits = [len(d) == meta[s + '_tokens'] and meta[s + '_chars'] > 0 for s, d in zip(splits, data)]
        fits += [d[i:i + 2 ** 24].max() < meta['vocab_size'] for d in data for i in range(0, len(d), 2 ** 24)]
        fits += [len(load_tokenizer(meta['tokenizer']).decode(range(meta['vocab_size']))) > 0]  # ids, strings
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        fits = [False]
    if not all(fits):
        raise UserError(f"--data_dir={data_dir} is incomplete or inconsistent (meta.json missing, unreadable "
                        "or not matching the token files); run prepare.py again")
    if len(data[1]) <= block_size:
        raise UserError(f"--block_size={block_size} needs more than the {len(data[1])} tokens of the val "
                        f"split; use --block_size={max(1, len(data[1]) - 1)} or less")
    return meta
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
    global device, dtype, compile, rank, world_size
    globals().update({**DEFAULTS, **overrides})
    found = [p for p in (f'{out_dir}/last.pt', f'{out_dir}/ckpt.pt') if os.path.isfile(p)]  # last.pt first
    keys = ('optimizer', 'scaler', 'iter_num', 'best_val_loss', 'config')  # resuming needs these too
    ckpt = load_model(found[0], keys=keys) if found and init_from == 'resume' else None
    kept = {k: v for k, v in ckpt['config'].items() if type(v) is type(DEFAULTS.get(k))} if ckpt else {}
    globals().update({**kept, **{k: DEFAULTS[k] for k in ('out_dir', 'device', 'dtype')}, **overrides})
    device, local_rank, g, capability = pick_device(device), 0, globals(), (0, 0)
    if 'RANK' in os.environ:  # started by torchrun: a process per device; NCCL joins GPUs, gloo CPUs
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if cuda := device.startswith('cuda'):  # a GPU by its index (set_device needs one); GPU_RECIPE's settings
        device = f'cuda:{local_rank}' if device == 'cuda' else device
        capability = torch.cuda.get_device_capability(device)  # 8.0 and up (Ampere...): native bfloat16
        g.update({k: v for k, v in GPU_RECIPE.items() if k not in overrides and not ckpt})
        if compile and capability < (7, 0):
            print(f"note: torch.compile needs compute capability 7.0 or more, this GPU has {capability}")
    compile = compile and capability >= (7, 0)  # the CPU stays eager
    if dtype == 'auto':  # bfloat16 where the GPU has it natively; on most CPUs it is many times slower
        dtype = ('bfloat16' if capability >= (8, 0) else 'float16') if cuda else 'float32'
    need = 16 * (12 * n_layer * n_embd ** 2 + 65536 * n_embd) + 4 * batch_size * block_size * n_layer * (
        34 * n_embd + 5 * n_head * block_size)  # about: weights, gradients, AdamW's moments, activations
    have = torch.cuda.mem_get_info(device)[1] if cuda else \
        os.sysconf('SC_PAGESIZE') * os.sysconf('SC_PHYS_PAGES')  # bytes of memory on the device
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
              (init_from == 'scratch' or found, f'{out_dir}/ holds no checkpoint; use --init_from=scratch'),
              (not ckpt or ckpt['iter_num'] < max_iters, f'{out_dir}/ has finished its {max_iters} steps; to '
               'train longer, resume with larger --max_iters and --lr_decay_iters'),
              (need < have, f'--batch_size={batch_size} x --block_size={block_size} at this model size needs '
               f'about {need / 2 ** 30:,.0f} GiB, more than {device} has ({have / 2 ** 30:,.0f} GiB); '
               'lower them')]
    if broken := [message for ok, message in rules if not ok]:
        raise UserError(broken[0])
    if (meta := read_data()) and ckpt and ckpt['tokenizer'] != meta['tokenizer']:
        raise UserError(f'{out_dir}/ was trained on another vocabulary; resume it with its own --data_dir')
    if world_size > 1:
        dist.init_process_group('nccl' if cuda else 'gloo')
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 tensor cores for any float32 matmul left
    return ckpt, meta
def main(argv):
    overrides = parse_args(argv, DEFAULTS, __file__)
    try:
        train(*setup(overrides))
        if dist.is_initialized():  # leave together: a process that tears down early breaks the others' links
            dist.barrier()
    except OSError as e:  # a full disk, a folder turned read-only...: the checkpoints are whole, old or new
        raise UserError(f"cannot write to {out_dir}/ ({e.strerror or e}); its checkpoints are kept; once it "
                        f"is fixed, resume: python gpt.py --init_from=resume --out_dir={out_dir}") from None
    finally:
        if dist.is_initialized():  # DDP sits in a reference cycle: collect it first, or its group is torn
            gc.collect()  # down at exit while the others are still connected, and the process aborts
            dist.destroy_process_group()
def run_cli(main, argv=None):  # a UserError or Ctrl-C ends a script with one line on stderr, no traceback
    try:
        main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except (UserError, KeyboardInterrupt) as e:  # under torchrun, process 0 speaks for all
        print(f"error: {str(e) or 'stopped by Ctrl-C'}", file=sys.stderr if rank == 0 else io.StringIO())
        sys.exit(2 if isinstance(e, UserError) else 130)
    except BrokenPipeError:  # `python sample.py | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush either
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports it

if __name__ == '__main__':
    run_cli(main)
