"""The reference GPT, a transformer trained from scratch on any text. Read top to bottom: the lesson first."""
import collections, gc, io, json, math, os, pathlib, re, signal, subprocess, sys, time
import numpy as np
import torch
from torch import distributed as dist, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# CONFIG. Every setting is a global with its meaning; --key=value on the command line overrides it. The
# defaults are a CPU recipe, the best tried (README) for 2.5 minutes on 2 cores; CUDA runs take GPU_RECIPE.
# The model's shape
n_layer = 2  # how many transformer blocks are stacked; 0: each prediction sees only its token and position
n_head = 4  # how many attention heads run side by side in each block
n_embd = 128  # channels per token: the vector (the 'residual stream') that every block adds to
block_size = 64  # how many tokens of context, at most, the model sees to predict the next one
dropout = 0.0  # what fraction of activations is zeroed in training; helps long runs on small data
# The optimization
batch_size = 16  # how many independent sequences are trained on in parallel
learning_rate = 1e-2  # the peak learning rate, reached at the end of warmup (a small model takes a large one)
max_iters = 4700  # how many optimizer steps to train for
warmup_iters = 50  # how many steps the learning rate ramps up over at the start
lr_decay_iters = 4700  # the step where the cosine decay reaches min_lr (usually = max_iters)
min_lr = 1e-4  # the learning rate after the decay (learning_rate / 100: the last steps settle finely)
weight_decay = 0.1  # how strongly AdamW pulls weight matrices and embeddings towards zero
beta1 = 0.9  # AdamW's momentum: how much of the past gradients each step keeps
beta2 = 0.95  # AdamW's memory of squared gradients, which sets each weight's own step size (short: fast runs)
grad_clip = 1.0  # the largest gradient norm a step may take (larger ones are scaled down); 0 turns it off
gradient_accumulation_steps = 1  # micro-batches per step: a step sees batch_size x this x processes rows
# Watching the run
eval_interval = 1000  # every this many steps: evaluate, print a sample and save checkpoints
eval_iters = 110  # batches of fixed windows per split at each eval (by default all of Shakespeare's val)
log_interval = 50  # print the training loss every this many steps
# The system: files, device and speed (safe to skip on a first read)
out_dir = 'out'  # where checkpoints go: last.pt (to resume) and ckpt.pt (best val, to sample from)
data_dir = 'data'  # where prepare.py wrote train.bin, val.bin and meta.json
init_from = 'scratch'  # 'scratch' starts a new model, 'resume' continues the one in out_dir
device = 'auto'  # 'auto' picks cuda, then mps, then cpu
dtype = 'auto'  # 'auto' is bfloat16 on GPUs that have it natively (Ampere and later), else float32
compile = True  # torch.compile each block on CUDA (CPU runs stay eager: there it made steps slower)
seed = 1337  # seeds every random choice: same seed, same run
# On CUDA, what you do not set comes from here: the reference model (10.76M parameters), trained to its best.
GPU_RECIPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                  learning_rate=1e-3, max_iters=2000, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
                  eval_interval=250, eval_iters=7)
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and isinstance(v, (bool, int, float, str))}
rank, world_size = 0, 1  # under torchrun (see setup): this process's number, and how many train together

# TOKENIZER. Text to ids and back: one id per distinct character, or byte-level BPE as in GPT-2.
class CharTokenizer:
    def __init__(self, vocab):
        self.vocab, self.vocab_size = vocab, len(vocab)  # id -> character
        self.stoi = {ch: i for i, ch in enumerate(vocab)}  # character -> id
    def encode(self, text):
        return [self.stoi[ch] for ch in text]
    def decode(self, ids):
        return ''.join(self.vocab[i] for i in ids)
class BPETokenizer:  # ids 0-255: the bytes; id 256 + i: the pair that prepare.py's merge i fused
    def __init__(self, merges):
        self.merges, self.vocab_size = [tuple(pair) for pair in merges], 256 + len(merges)
        self.bytes = [bytes([i]) for i in range(256)]  # id -> the bytes it stands for
        for a, b in self.merges:
            self.bytes.append(self.bytes[a] + self.bytes[b])
    def encode(self, text):
        # In latin-1, byte b is the character chr(b); merge i replaces each of its pairs with chr(256 + i)
        s = text.encode('utf-8').decode('latin-1')
        for i, (a, b) in enumerate(self.merges):
            s = s.replace(chr(a) + chr(b), chr(256 + i))
        return [ord(c) for c in s]
    def decode(self, ids):  # a cut through a multi-byte character decodes as U+FFFD instead of failing
        return b''.join(self.bytes[i] for i in ids).decode('utf-8', errors='replace')
def load_tokenizer(meta):  # meta: the 'tokenizer' entry of meta.json (or of a checkpoint)
    return BPETokenizer(meta['merges']) if meta['kind'] == 'bpe' else CharTokenizer(meta['vocab'])

# DATA: prepare.py's uint16 token files, read through np.memmap (no corpus has to fit in memory).
tokens = {}  # 'train', 'val' -> its token ids, mapped once by read_data (in the safety net, at the end)
def get_batch(split, starts=None):  # x, y (B, T) each (B: batch_size, T: block_size), at starts or random
    if starts is None:  # each row must fit in the split
        starts = torch.randint(len(tokens[split]) - block_size, (batch_size,)).numpy()
    # Row b is the T + 1 tokens from starts[b] on: x its first T, y its last T (x shifted by one), so y[t] is
    # the token after x[0..t]: a row teaches T predictions at once (the causal mask sees to that).
    index = np.asarray(starts)[:, None] + np.arange(block_size + 1)  # (B, T + 1): row b is s_b .. s_b + T
    rows = torch.from_numpy(tokens[split][index].astype(np.int64)).to(device)  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]

# MODEL. Each token becomes a vector (token + position embedding); blocks refine them with attention (a token
# gathers from earlier ones) and a feed-forward net; a last layer turns each into logits, next-token scores.
# Shapes: B batch, T time (tokens), C = n_embd channels, nh heads of hs = C / nh, S keys, V vocabulary.
GPTConfig = collections.namedtuple('GPTConfig', 'vocab_size block_size n_layer n_head n_embd dropout flash',
                                   defaults=(0.0, True))
class MultiHeadAttention(nn.Module):  # n_head heads of hs = C / nh channels, each learns its own pattern
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # query, key, value of all heads at once
        self.heads = Head(cfg.dropout, cfg.flash)  # Head (below): one head's math, run for all heads at once
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)  # mixes the heads' outputs into the residual stream
        self.resid_dropout = nn.Dropout(cfg.dropout)
    def forward(self, x, cache=None):
        B, T, C = x.shape
        # 1) Each token makes a query (what it looks for), a key (what it offers) and a value (what it passes
        # on to the tokens that attend to it): one matmul, (B, T, 3C), cut into three (B, T, C).
        q, k, v = self.qkv(x).split(C, dim=2)
        # 2) Head h owns channels h*hs to (h+1)*hs. With C = 128, nh = 4, hs = 32: view cuts (B, T, 128) into
        # (B, T, 4, 32), and transpose gives (B, 4, T, 32): the heads become a batch dimension.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask = None  # None means the plain causal mask, which Head applies
        if cache is not None:  # generation only (sample.py): the keys and values of earlier tokens join
            k, v, mask = cache.append(k, v)  # (B, nh, S, hs), S: cached + new; mask (T, S)
        y = self.heads(q, k, v, mask)  # 3) every head attends (Head, next): (B, nh, T, hs)
        # 4) The heads side by side again; view needs the memory in that order, which contiguous makes.
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))  # 5) one layer mixes what the heads found
class Head(nn.Module):  # one head's math on (T, hs), written so that all heads run at once: (B, nh, T, hs)
    def __init__(self, dropout, flash=True):
        super().__init__()
        self.flash, self.dropout = flash, nn.Dropout(dropout)
    def forward(self, q, k, v, mask=None):
        if not self.flash:  # written out: the lesson
            # Each score says how much a query's token wants a key's. A sum of hs products of unit-variance
            # terms has variance hs: dividing by sqrt(hs) keeps it near 1, and the softmax soft, not one-hot.
            wei = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B,nh,T,hs) @ (B,nh,hs,S) -> (B,nh,T,S)
            # The mask marks what each token may see: row t is true for keys 0..t, false for the later ones,
            # because the target of position t is token t + 1 (no peeking). Hidden scores become -inf.
            mask = torch.ones_like(wei[0, 0], dtype=torch.bool).tril() if mask is None else mask  # (T, T)
            wei = wei.masked_fill(~mask, float('-inf')).softmax(dim=-1)  # each row sums to 1; exp(-inf) is 0
            return self.dropout(wei) @ v  # (B, nh, T, S) @ (B, nh, S, hs) -> (B, nh, T, hs): a weighted mean
        # The same math fused into one kernel (flash attention) that never stores the scores; a test checks it
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
    LayerNorm rescales each token's vector to mean 0 and variance 1, then applies a learned gain and bias.
    Pre-norm (GPT-2) normalizes only what each part reads, x + f(LN(x)), unlike the 2017 post-norm LN(x +
    f(x)): no LayerNorm on the residual path, so gradients flow back along its sums unchanged. x grows from
    block to block, so GPT normalizes it once, ln_f, before lm_head: else the logits' scale would drift."""
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
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one vector embeds token i and scores it
        # GPT-2's init: weights from N(0, 0.02). The 2 * n_layer .proj layers all add to the residual
        # stream, so theirs are divided by sqrt(2 * n_layer): at init its end variance is alike at any depth.
        for name, module in self.named_modules():
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
        # The loss: -log(probability of the true next token), averaged over the B * T positions. At init all
        # V tokens are about equally likely, so the first loss is about ln V: 4.17 for 65 characters.
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        # Past block_size tokens the window slides by one token (sample.py's KV cache jumps by half a block).
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[0][:, -1].float()  # (B, V): the last position
            logits = logits - logits.amax(dim=-1, keepdim=True)  # the same softmax, no overflow; the max is 0
            if top_k is not None:  # only the k likeliest tokens stay candidates
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float('-inf'))
            # Temperature 0 is greedy: the likeliest token (the max, now 0) gets all the probability.
            probs = F.softmax(logits / temperature, dim=-1) if temperature > 0 else (logits == 0).float()
            idx = torch.cat((idx, torch.multinomial(probs, 1)), dim=1)  # (B, T + 1)
        return idx

# EVALUATION: how good is the model? Its mean loss on each split, bits per character, and a sample.
def autocast():  # mixed precision if dtype asks: matmuls in bfloat16, reductions in float32
    return torch.autocast(device.split(':')[0], getattr(torch, dtype), enabled=dtype != 'float32')
@torch.no_grad()
def estimate_loss(model, meta, splits=('train', 'val')):
    # A split of N tokens holds n = (N - 1) // T windows of T + 1 tokens; k of them, spread evenly, count.
    model.eval()  # dropout off: the loss of the model itself, not of a randomly thinned copy
    out = {}
    for split in splits:
        n = (meta[f'{split}_tokens'] - 1) // block_size
        k = min(n, eval_iters * batch_size)  # with the defaults, all of Shakespeare's val split
        starts = np.arange(k) * n // k * block_size  # window i * n // k starts at token (i * n // k) * T
        total = torch.zeros((), device=device)
        for i in range(0, k, batch_size):
            x, y = get_batch(split, starts[i:i + batch_size])
            with autocast():
                total += model(x, y)[1].float() * len(x)  # the batch's mean loss, weighted by its size
        out[split] = total.item() / k
    return out  # the model stays in eval mode (the sample after it too) until train_step
def evaluate(model, meta):  # -> train loss, val loss, val bits per character, a sample of 100 tokens
    with torch.compiler.set_stance('force_eager'):  # eval shapes differ: run uncompiled, not recompile
        train_loss, val_loss = estimate_loss(model, meta).values()
        torch.manual_seed(seed)  # the same seed at every eval: watch the same text improve
        out = model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), 100)[0, 1:]
    # nats/token x tokens/character / ln 2 = bits per character, which compares across tokenizers (BPE, chars)
    bpc = val_loss * meta['val_tokens'] / meta['val_chars'] / math.log(2)
    return train_loss, val_loss, bpc, load_tokenizer(meta['tokenizer']).decode(out.tolist()).strip()

# TRAINING: the learning-rate schedule, the optimizer, one step, and the loop that repeats it.
def get_lr(it):  # the learning rate of step it
    # 1) Warm up: a fresh network's gradients are large and erratic, and AdamW scales each step by a running
    # average of gradient sizes, unreliable after few steps; full steps now could throw the weights far off.
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)  # it + 1: step 0's rate is not 0
    # 2) Decay along a cosine to min_lr: each batch's gradient is noisy, so big steps bounce around a minimum.
    if it < lr_decay_iters:
        progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> learning_rate, 1 -> min_lr
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    return min_lr  # 3) after the decay
def build(vocab_size, ckpt=None):  # the model and its AdamW optimizer: new, or as ckpt left them
    torch.manual_seed(seed)  # the same initial weights in every process
    model = GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout)).to(device)
    # Weight decay (against overfitting) on matrices and embeddings, not on biases and gains (dim < 2).
    groups = [{'params': [p for p in model.parameters() if p.dim() >= 2]},
              {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, learning_rate, (beta1, beta2), weight_decay=weight_decay)
    # Exact resume. A checkpoint holds all that training changes: the weights, AdamW's moments, the step and
    # the best val loss (Run.save). The rate follows from the step, and train_step reseeds from it, so a
    # resumed run is bit for bit one that never stopped (on the CPU; GPUs may sum in another order).
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])  # AdamW's moments: without them, the steps would differ
    for block in model.blocks if compile else []:  # CUDA: fused kernels, compiled once for all the identical
        block.compile()  # blocks: far quicker than compiling the whole model
    return model, optimizer
def train_step(model, optimizer, it):  # -> the mean loss as a tensor (.item() would wait for a GPU)
    model.train()  # dropout on (estimate_loss turned it off)
    torch.manual_seed(hash((seed, it, rank)))  # ints hash the same in every run: resumed, the same batches
    for group in optimizer.param_groups:
        group['lr'] = get_lr(it)
    total = 0.0
    for micro in range(gradient_accumulation_steps):  # N micro-batches: the gradients of N batches add up
        x, y = get_batch('train')
        if isinstance(model, DDP):  # under torchrun, average the gradients over processes once, at the end
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with autocast():
            loss = model(x, y)[1] / gradient_accumulation_steps  # / N: N backward()s add up to the mean's
        loss.backward()  # the loss's gradient for every weight
        total += loss.detach()
    if grad_clip > 0:  # one unlucky batch cannot throw the weights far: the gradient's norm is capped
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # AdamW moves each weight against its gradient
    optimizer.zero_grad(set_to_none=True)
    return total
def train(ckpt, meta):  # the training loop; ckpt: the checkpoint that a resumed run continues, or None
    model, optimizer = build(meta['vocab_size'], ckpt)
    step_model = DDP(model) if world_size > 1 else model  # DDP averages the gradients of all processes
    run = Run(model, optimizer, meta, ckpt)  # logs, checkpoints, stops: the safety net, at the end
    for it in range(run.start, max_iters + 1):  # it = steps done; it == max_iters: a last eval and save
        if it % eval_interval == 0 or it == max_iters:
            train_loss, val_loss, bpc, text = evaluate(model, meta)
            run.log(it, val_loss, f"iter {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"{bpc:.4f} bits/char\n{text}", f'{train_loss:.4f}', f'{val_loss:.4f}', f'{bpc:.4f}')
            # last.pt, the latest state, is for resuming; ckpt.pt, the best val so far, is for sampling
            improved = val_loss < run.best_val
            run.best_val = min(run.best_val, val_loss)
            run.save(it, ['ckpt.pt', 'last.pt'] if improved else ['last.pt'])
        if it == max_iters:
            break
        run.stop_if_asked(it)  # Ctrl-C, SIGTERM or SIGHUP: save last.pt and exit
        loss = train_step(step_model, optimizer, it)
        if (it + 1) % log_interval == 0 or it + 1 == max_iters:
            run.log_step(it + 1, loss)

# THE SAFETY NET (skip on a first read): what keeps a run's work from being lost, and a run from going on
# wrong in silence. A common mistake ends in one line and exit code 2; rarer misuse in Python's traceback.
stops = []  # the signals received since the run started: each asks it to stop (stop_if_asked)
SIGNALS = [signal.SIGINT, signal.SIGTERM]  # Ctrl-C, and what torchrun or a system sends to end a program
if hasattr(signal, 'SIGHUP') and signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # not Windows, nor nohup
    SIGNALS.append(signal.SIGHUP)  # the terminal closed, or the ssh connection dropped
class UserError(Exception):  # a mistake the user can fix (a setting, a file): one line, exit code 2
    pass
def agree(value, op=dist.ReduceOp.SUM):  # a number summed (or maxed) over all processes, so all act alike
    if world_size > 1:
        value = torch.tensor(float(value), device=device)
        dist.all_reduce(value, op)
    return float(value)
def say(*args, **kwargs):  # process 0 alone prints, and none after a SIGHUP (1): its terminal is gone
    if rank == 0 and 1 not in stops:
        print(*args, flush=True, **kwargs)
class Run:  # for train(): log lines and log.csv, checkpoints, and stops; process 0 alone writes files
    def __init__(self, model, optimizer, meta, ckpt):
        self.model, self.optimizer, self.meta = model, optimizer, meta
        self.start, self.best_val = (ckpt['iter_num'], ckpt['best_val_loss']) if ckpt else (0, math.inf)
        self.t_log, self.it_log = time.time(), self.start
        say(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} in {dtype}")
        if not ckpt and rank == 0:  # a new run claims out_dir by making log.csv: of two runs, only one can
            os.makedirs(out_dir, exist_ok=True)
            try:
                with open(f'{out_dir}/log.csv', 'x') as f:
                    f.write('iter,train_loss,val_loss,val_bpc,lr\n')
            except FileExistsError:
                raise UserError(f"{out_dir}/ holds another run's log.csv; use another --out_dir") from None
        stops.clear()
        for s in SIGNALS:
            signal.signal(s, lambda sig, _: stops.append(sig))
    def check(self, it, value, what='the loss'):  # nan or inf ends the run before it can replace a checkpoint
        if not math.isfinite(value):
            sys.exit(1 if rank else f"error: {what} is {value} at iter {it}; lower --learning_rate")
    def log(self, it, loss, line, train='', val='', bpc=''):  # a line and a row of log.csv
        self.check(it, loss)
        say(line)
        if rank == 0:
            with open(f'{out_dir}/log.csv', 'a') as f:
                f.write(f"{it},{train},{val},{bpc},{get_lr(it):.4g}\n")  # lr of the step that starts at it
    def log_step(self, it, loss):
        loss, dt = agree(loss.item()) / world_size, (time.time() - self.t_log) / (it - self.it_log)
        self.log(it, loss, f"iter {it}/{max_iters}: loss {loss:.4f}, {dt * 1000:.0f} ms/iter", f'{loss:.4f}')
        self.t_log, self.it_log = time.time(), it
    def stop_if_asked(self, it):  # after a signal, all processes agree to stop at this step: save last.pt
        asked = int(agree(stops[0] if stops else 0, dist.ReduceOp.MAX))
        if asked:
            self.save(it, ['last.pt'])
            say(f"stopped by {signal.Signals(asked).name} at iter {it}; resume with --init_from=resume "
                f"--out_dir={out_dir}")
            sys.exit(128 + asked)
    def save(self, it, names):  # atomic, ckpt.pt first: after a crash at any moment the run resumes from one
        # A step that diverged leaves weights of nan or inf, and a sum of them: such a state is never saved.
        self.check(it, sum(p.detach().sum() for p in self.model.parameters()).item(), 'the sum of weights')
        buffer = io.BytesIO()  # serialized in memory first, so that a full disk fails in write, as an OSError
        config = {**{k: globals()[k] for k in DEFAULTS}, 'data_dir': os.path.abspath(data_dir)}  # in full
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(), 'iter_num': it,
                 'best_val_loss': self.best_val, 'model_args': self.model.config._asdict(), 'config': config}
        torch.save({**state, 'tokenizer': self.meta['tokenizer'], 'data_hash': self.meta.get('hash')}, buffer)
        for path in (f'{out_dir}/{name}' for name in names if rank == 0):
            with open(path + '.tmp', 'wb') as f:  # a disk that fills raises in write or flush: no rename then
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())  # on the disk before the rename makes it the checkpoint
            os.replace(path + '.tmp', path)  # the old file or the new one, never half of one
        self.t_log, self.it_log = time.time(), it  # an eval's time does not count in the training speed
def load_model(path, device='cpu'):  # a checkpoint, or a folder's ckpt.pt -> (model in eval mode, tokenizer)
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train a model first: python gpt.py")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)  # tensors and plain values: runs no code
    model = GPT(GPTConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])
    return model.to(device).eval(), load_tokenizer(ckpt['tokenizer'])
def read_data():  # meta.json, and the token files mapped into tokens once, for the whole run
    if not os.path.isfile(f'{data_dir}/meta.json') and data_dir == 'data' and world_size == 1:
        if subprocess.run([sys.executable, pathlib.Path(__file__).parent / 'prepare.py']).returncode:
            sys.exit(1)  # prepare.py said why
    for split in ('train', 'val'):
        tokens[split] = np.memmap(f'{data_dir}/{split}.bin', dtype=np.uint16, mode='r')
        if len(tokens[split]) <= block_size:
            raise UserError(f"--block_size={block_size} is not shorter than the {split} split; lower it")
    return json.loads(pathlib.Path(data_dir, 'meta.json').read_text('utf-8'))
def parse_args(argv, defaults, source):  # --key=value overrides, typed as the defaults (true/false for bools)
    if {'-h', '--help'} & set(argv):  # each key with its default and its comment in the source file
        notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", pathlib.Path(source).read_text('utf-8'), re.M))
        on_cuda = {k: f' (on CUDA: {v})' for k, v in GPU_RECIPE.items()} if defaults is DEFAULTS else {}
        for k, v in defaults.items():
            say(f"--{f'{k}={v!r}':<33} {notes.get(k, '')}{on_cuda.get(k, '')}")
        sys.exit()
    given = {}
    for arg in argv:
        key, eq, value = arg.removeprefix('--').partition('=')
        if key not in defaults or not arg.startswith('--') or not eq:
            raise UserError(f"unknown setting {arg}; python {os.path.basename(source)} --help lists them")
        kind = type(defaults[key])
        try:
            given[key] = {'true': True, 'false': False}[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise UserError(f"--{key}={value}: expected {'true or false' if kind is bool else kind.__name__}")
    return given
def pick_device(name):  # 'auto' -> cuda, else mps, else cpu; a device this machine lacks is an error
    here = {'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available(), 'cpu': True}
    if not here.get(name.split(':')[0], name == 'auto'):
        raise UserError(f"--device={name} is not available on this machine; use --device=cpu (or auto)")
    return [d for d in here if here[d]][0] if name == 'auto' else name
def setup(overrides):  # settings, device and data, all checked before any work; -> (checkpoint or None, meta)
    global device, dtype, compile, rank, world_size
    globals().update({**DEFAULTS, **overrides})
    found = [p for p in (f'{out_dir}/last.pt', f'{out_dir}/ckpt.pt') if os.path.isfile(p)]  # last.pt first
    if init_from == 'resume' and not found:
        raise UserError(f"no checkpoint in {out_dir}/ to resume; train one first: python gpt.py")
    if found and init_from != 'resume':
        raise UserError(f"{out_dir}/ holds a run; resume it (--init_from=resume), or use another --out_dir")
    ckpt = torch.load(found[0], map_location='cpu', weights_only=True) if init_from == 'resume' else None
    # A resumed run keeps its settings, dtype included; the device and compile are this machine's
    kept = {k: v for k, v in ckpt['config'].items() if type(v) is type(DEFAULTS.get(k))} if ckpt else {}
    globals().update({**kept, **{k: DEFAULTS[k] for k in ('out_dir', 'device', 'compile')}, **overrides})
    device, local_rank, capability = pick_device(device), 0, (0, 0)
    if 'RANK' in os.environ:  # started by torchrun: a process per device; NCCL joins GPUs, gloo CPUs
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    cuda = device.startswith('cuda')
    if cuda:  # a GPU by its index (set_device needs one); GPU_RECIPE's settings
        device = f'cuda:{local_rank}' if device == 'cuda' else device
        capability = torch.cuda.get_device_capability(device)  # 8.0 and up (Ampere...): native bfloat16
        globals().update({k: v for k, v in GPU_RECIPE.items() if k not in overrides and not ckpt})
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 tensor cores for any float32 matmul left
    compile = compile and capability >= (7, 0)  # Triton needs 7.0; the CPU stays eager
    dtype = ('bfloat16' if capability >= (8, 0) else 'float32') if dtype == 'auto' else dtype  # native only
    for k in ('block_size', 'n_layer', 'n_head', 'n_embd', 'weight_decay', 'beta1', 'beta2'):
        if k in kept and k in overrides and kept[k] != overrides[k]:  # AdamW's would be lost in silence
            raise UserError(f"--{k}={overrides[k]}, but a resumed run keeps its {kept[k]}")
    if n_embd % n_head:
        raise UserError(f'--n_embd={n_embd} must be a multiple of --n_head={n_head}')
    if ckpt and ckpt['iter_num'] >= max_iters:
        raise UserError(f"{out_dir}/ is at iter {ckpt['iter_num']}; resume with a larger --max_iters")
    meta = read_data()
    # prepare.py's hash of the tokens and tokenizer: a checkpoint knows the data it was trained on
    if ckpt and ckpt.get('data_hash') != meta.get('hash'):
        raise UserError(f"{out_dir}/ was trained on other data; resume it on its own, or use a new --out_dir")
    if world_size > 1:
        dist.init_process_group('nccl' if cuda else 'gloo')
    return ckpt, meta
def main(argv):
    try:
        train(*setup(parse_args(argv, DEFAULTS, __file__)))
        if dist.is_initialized():  # leave together: a process that tears down early breaks the others' links
            dist.barrier()
    finally:
        if dist.is_initialized():  # DDP sits in a reference cycle: collect it first, or its group is torn
            gc.collect()  # down at exit while the others are still connected, and the process aborts
            dist.destroy_process_group()
def run_cli(main, argv=None):  # a mistake to fix, or Ctrl-C, ends a script in one line on stderr
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (UserError, KeyboardInterrupt) as e:
        say(f"error: {str(e) or 'stopped by Ctrl-C'}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 130)

if __name__ == '__main__':
    run_cli(main)
