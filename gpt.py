"""The reference GPT, a transformer trained from scratch on any text. Read top to bottom: the lesson first."""
import collections, contextlib, gc, io, json, math, os, pathlib, re, shlex, signal, subprocess, sys, time
import numpy as np
import torch
from torch import distributed as dist, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# CONFIG. Every setting is a global with its meaning; --key=value on the command line overrides it. The
# defaults are a CPU recipe: in 2.5 minutes on 2 cores, 2 blocks trained for 4,700 steps beat 3 to 6 blocks
# trained for fewer (the README lists what was tried). A CUDA run takes GPU_RECIPE (below) instead.
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
dtype = 'auto'  # 'auto' is bfloat16 on GPUs that have it natively (float16 on older ones), else float32
compile = True  # torch.compile each block on CUDA (CPU runs stay eager: there it made steps slower)
flash = True  # attention by the fused F.scaled_dot_product_attention; False runs the written-out math
seed = 1337  # seeds every random choice: same seed, same run
# On CUDA, what you do not set comes from here: the reference model (10.76M parameters), trained to its best.
GPU_RECIPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                  learning_rate=1e-3, max_iters=2000, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
                  eval_interval=250, eval_iters=7)
# The settings above, by name: what --help lists and a checkpoint keeps
DEFAULTS = {k: v for k, v in globals().items() if k[0] != '_' and isinstance(v, (bool, int, float, str))}

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
        # latin-1 turns byte b into the character chr(b), so the text becomes a string of ids; merge i, in
        # order, replaces each of its pairs with chr(256 + i); ord() then reads the ids back.
        s = text.encode('utf-8').decode('latin-1')
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
        starts = torch.randint(len(data) - block_size, (batch_size,)).numpy()  # each row must fit in data
    # Each row is T + 1 consecutive tokens: x its first T, y its last T (x shifted by one). So a row teaches T
    # predictions at once: y[t] is the token after x[0..t], for each t (the causal mask sees to that).
    # starts[:, None] + arange(T + 1) is a (B, T + 1) grid of indices: row b reads data[s_b .. s_b + T].
    rows = torch.from_numpy(data[np.asarray(starts)[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device.startswith('cuda'):  # page-locked memory: the copy to the GPU runs while it computes
        rows = rows.pin_memory()
    rows = rows.to(device, non_blocking=True)  # (B, T + 1)
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
            # Each score says how much a query's token wants a key's. A dot product of hs terms has a variance
            # that grows with hs, so dividing by sqrt(hs) keeps it near 1 and the softmax soft, not one-hot.
            wei = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B,nh,T,hs) @ (B,nh,hs,S) -> (B,nh,T,S)
            # The mask hides later tokens, because the target of position t is token t + 1: no peeking.
            mask = torch.ones_like(wei[0, 0], dtype=torch.bool).tril() if mask is None else mask  # (T, T)
            wei = wei.masked_fill(~mask, float('-inf')).softmax(dim=-1)  # row t: keys 0..t; exp(-inf) is 0
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
    LayerNorm rescales each token's vector to mean 0 and variance 1, then applies a learned gain (scale) and
    bias (shift). Pre-norm (GPT-2) normalizes only what each part reads, x + f(LN(x)), so no LayerNorm sits on
    the residual path: gradients reach the first blocks unchanged, however deep the stack (post-norm, LN(x +
    f(x)), as in the 2017 transformer, puts a LayerNorm on that path). But x itself is never normalized and
    its scale grows with depth, so GPT applies ln_f once, before lm_head reads it."""
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
        # GPT-2's init: weights from N(0, 0.02). A block's two .proj layers write into the residual stream, so
        # theirs are divided by sqrt(2 * n_layer): then the stream's variance does not grow with depth.
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
        # The loss: -log(probability of the true next token), averaged over the B * T positions (as B*T rows)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):  # sample.py adds a KV cache
        for _ in range(max_new_tokens):  # each new token is drawn given at most the last block_size tokens
            logits = self(idx[:, -self.config.block_size:])[0][:, -1].float()  # (B, V): the last position's
            logits = logits - logits.amax(dim=-1, keepdim=True)  # the same softmax, no overflow; the max is 0
            if top_k is not None:  # only the k likeliest tokens stay candidates
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float('-inf'))
            # Temperature 0 is greedy: the likeliest token (the max, now 0) gets all the probability.
            probs = F.softmax(logits / temperature, dim=-1) if temperature > 0 else (logits == 0).float()
            idx = torch.cat((idx, torch.multinomial(probs, 1)), dim=1)  # (B, T + 1)
        return idx

# EVALUATION: how good is the model? Its mean loss on each split, bits per character, and a sample.
def autocast():  # mixed precision if dtype asks: matmuls in bfloat16 (or float16), reductions in float32
    return torch.autocast(device.split(':')[0], getattr(torch, dtype), enabled=dtype != 'float32')
@torch.no_grad()
def estimate_loss(model, meta, splits=('train', 'val')):
    # A split of N tokens holds n = (N - 1) // T windows end to end (each needs T + 1 tokens: inputs and, one
    # further, targets). k of the n, evenly spread, are scored.
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
    # nats per token x tokens per character = nats per character; / ln 2 = bits per character, which compares
    # across tokenizers (a BPE token holds several characters)
    bpc = val_loss * meta['val_tokens'] / meta['val_chars'] / math.log(2)
    return train_loss, val_loss, bpc, load_tokenizer(meta['tokenizer']).decode(out.tolist()).strip()

# TRAINING: the learning-rate schedule, the optimizer, one step, and the loop that repeats it.
def get_lr(it):  # the learning rate of step it
    # 1) Warm up: a fresh network's gradients are large and erratic, and AdamW scales each step by a running
    # average of gradient sizes, unreliable after few steps; full steps now could throw the weights far off.
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)  # it + 1: step 0's rate is not 0
    # 2) Decay, along a cosine to min_lr: big steps while the loss falls fast, then small ones, so that the
    # weights settle into the bottom of a valley instead of bouncing from side to side.
    if it < lr_decay_iters:
        progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> learning_rate, 1 -> min_lr
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
    return min_lr  # 3) after the decay
def build(vocab_size, ckpt=None):  # the model, its AdamW optimizer and loss scaler: new, or as ckpt left them
    torch.manual_seed(seed)  # the same initial weights in every process
    model = GPT(GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, flash)).to(device)
    # Weight decay (against overfitting) on matrices and embeddings (dim >= 2) only, not on the biases and
    # LayerNorm gains, which only shift or scale a signal: pulling them towards 0 would not help.
    groups = [{'params': [p for p in model.parameters() if p.dim() >= 2]},
              {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, learning_rate, (beta1, beta2), weight_decay=weight_decay,
                                  fused=device.split(':')[0] in ('cuda', 'cpu'))  # one kernel for all
    scaler = torch.amp.GradScaler(enabled=dtype == 'float16')  # float16 only: small gradients would underflow
    # Exact resume. A checkpoint holds all the state that training changes: the model, the optimizer and the
    # scaler, the step, the best val loss and the settings (Run.save). The rate follows from the step, and
    # train_step reseeds from the step (no random state to save), so a resumed run is bit for bit one that
    # never stopped (on the CPU; GPUs may sum in another order).
    if ckpt:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])  # AdamW's moments: without them, the steps would differ
        scaler.load_state_dict(ckpt['scaler'] or scaler.state_dict())  # a bfloat16 run saved no scale
    for block in model.blocks if compile else []:  # CUDA: fused kernels, compiled once for all the identical
        block.compile()  # blocks: far quicker than compiling the whole model
    return model, optimizer, scaler
def train_step(model, optimizer, scaler, it):  # -> the mean loss as a tensor (.item() would wait for a GPU)
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
        scaler.scale(loss).backward()  # the loss's gradient for every weight (the scaler acts in float16)
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
    run = Run(model, optimizer, scaler, meta, ckpt)  # logs, checkpoints and stops: see the safety net
    for it in range(run.start, max_iters + 1):  # it = steps done; it == max_iters: a last eval and save
        if it % eval_interval == 0 or it == max_iters:
            train_loss, val_loss, bpc, text = evaluate(model, meta)
            run.log(it, val_loss, f"iter {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"{bpc:.4f} bits/char\n{text}", f'{train_loss:.4f}', f'{val_loss:.4f}', f'{bpc:.4f}')
            # last.pt, the latest state, is what a resume continues; ckpt.pt, the best val loss so far, is
            # what to sample from (on a small text, a long run ends up learning it by heart: it overfits)
            improved = val_loss < run.best_val
            run.best_val = min(run.best_val, val_loss)
            run.save(it, ['ckpt.pt', 'last.pt'] if improved else ['last.pt'])
        if it == max_iters:
            break
        run.stop_if_asked(it)  # Ctrl-C, SIGTERM or a closed output: save last.pt and exit
        loss = train_step(step_model, optimizer, scaler, it)
        if (it + 1) % log_interval == 0 or it + 1 == max_iters:
            run.log_step(it + 1, loss)

# THE SAFETY NET (skip on a first read): what makes a run safe to stop, resume and spread over processes.
# Under torchrun, process 0 alone prints and writes files, and all processes agree at each eval and log step.
rank, world_size, stops = 0, 1, []  # stops: signals received (2 Ctrl-C, 15 SIGTERM), or 13: output closed
class UserError(Exception):  # a mistake the user can fix (a setting, a file): one line, exit code 2
    pass
def agree(value, op=dist.ReduceOp.SUM):  # a number summed (or maxed) over all processes: all act alike
    if world_size > 1:
        dist.all_reduce(value := torch.tensor(float(value), device=device), op)
    return float(value)
def say(*args, err=False, **kwargs):  # print on process 0; a failure to print never fails the run
    try:
        if rank == 0 and (stream := sys.stderr if err else sys.stdout):  # None if closed (`>&-`)
            print(*args, file=stream, flush=True, **kwargs)
    except (OSError, ValueError) as e:  # a reader that left (`| head`) stops the run as Ctrl-C would;
        stops.extend([13] if isinstance(e, BrokenPipeError) else [])  # a full disk or a closed file do not
        with contextlib.suppress(OSError, ValueError):  # unheard from here on, exit's flush included
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
def resume_command():
    return f"python gpt.py --init_from=resume --out_dir={shlex.quote(out_dir)}"
def write_files(write):  # process 0 writes every file; a failure there ends all processes, in one line
    try:
        error = write() if rank == 0 else None
    except OSError as e:
        error = 'a file or a link has that name' if os.path.lexists(out_dir) and not os.path.isdir(out_dir) \
            else e.strerror or e
    if agree(error is not None):  # the checkpoints stay whole, old or new (Run.save)
        kept = any(os.path.isfile(f'{out_dir}/{name}') for name in ('last.pt', 'ckpt.pt'))
        kept = f"; its checkpoints are kept: once it is fixed, resume with {resume_command()}" if kept else ''
        raise UserError(f"cannot write to {out_dir}/ ({error}){kept}")
class Run:  # for train(): log lines and log.csv, checkpoints, and stops
    def __init__(self, model, optimizer, scaler, meta, ckpt):
        self.model, self.optimizer, self.scaler, self.meta = model, optimizer, scaler, meta
        self.start, self.best_val = (ckpt['iter_num'], ckpt['best_val_loss']) if ckpt else (0, math.inf)
        self.t_log, self.it_log = time.time(), self.start
        self.tokens = batch_size * block_size * gradient_accumulation_steps * world_size  # per step
        say(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} in {dtype}, "
            f"{'its own settings' if ckpt else 'the gpu recipe' if 'cuda' in device else 'defaults'}, "
            f"{self.tokens:,} tokens per step, "
            f"{f'resuming at iter {self.start}' if ckpt else 'from scratch'}")
        if not ckpt:  # a new run starts log.csv (and out_dir); a resumed run appends to it
            self.append(('iter', 'train_loss', 'val_loss', 'val_bpc', 'lr', 'tokens_per_s'), 'w')
        stops.clear()  # from here Ctrl-C and SIGTERM ask the run to stop (stop_if_asked); main undoes it
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda sig, _: stops.append(sig))
    def append(self, row, mode='a'):  # a row of log.csv
        def write():
            os.makedirs(out_dir, exist_ok=True)
            with open(f'{out_dir}/log.csv', mode) as f:
                f.write(','.join(map(str, row)) + '\n')
        write_files(write)
    def log(self, it, loss, line, train='', val='', bpc='', speed=''):  # a line and a log.csv row
        if not math.isfinite(loss):  # nan or inf ends the run first, before it can overwrite a checkpoint
            sys.exit(1 if rank else f"error: the loss is {loss} at iter {it}: training diverged; lower "
                     f"--learning_rate (now {learning_rate}) or raise --warmup_iters; checkpoints are kept")
        say(line)
        self.append((it, train, val, bpc, f'{get_lr(it):.4g}', speed))  # lr: the rate of step it
    def log_step(self, it, loss):
        loss, dt = agree(loss.item()) / world_size, (time.time() - self.t_log) / (it - self.it_log)
        self.log(it, loss, f"iter {it}/{max_iters}: loss {loss:.4f}, {dt * 1000:.0f} ms/iter, "
                 f"{self.tokens / dt:,.0f} tok/s, ETA {(max_iters - it) * dt / 60:.1f} min",
                 f'{loss:.4f}', speed=round(self.tokens / dt))
        self.t_log, self.it_log = time.time(), it
    def stop_if_asked(self, it):  # after a signal: save last.pt, exit; under torchrun agreed at log steps
        if world_size > 1 and it % log_interval == 0 or world_size == 1 and stops:
            if asked := int(agree(stops[0] if stops else 0, dist.ReduceOp.MAX)):
                self.save(it, ['last.pt'])  # first: whatever happened to the output, the state is kept
                why = 'its output closing' if asked == 13 else signal.Signals(asked).name
                say(f"stopped by {why} at iter {it}; saved last.pt. Resume with: {resume_command()}",
                    err=13 in stops)  # with stdout gone, on stderr
                sys.exit(128 + asked)
    def save(self, it, names):  # atomic, ckpt.pt first: after a crash at any moment the run resumes from one
        def write():
            buffer = io.BytesIO()  # serialized in memory first: a full disk then raises an OSError
            # data_dir in full, so that a run resumed from another folder finds its data
            config = {**{k: globals()[k] for k in DEFAULTS}, 'data_dir': os.path.abspath(data_dir)}
            torch.save({'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                        'scaler': self.scaler.state_dict(), 'best_val_loss': self.best_val, 'iter_num': it,
                        'tokenizer': self.meta['tokenizer'], 'model_args': self.model.config._asdict(),
                        'config': config}, buffer)
            for path in (f'{out_dir}/{name}' for name in names):
                with open(path + '.tmp', 'wb', buffering=0) as f:  # unbuffered: fsync then has every byte
                    f.write(buffer.getbuffer())
                    os.fsync(f.fileno())  # on the disk before the rename makes it the checkpoint
                os.replace(path + '.tmp', path)  # the old file or the new one, never half of one
        write_files(write)
        self.t_log, self.it_log = time.time(), it  # an eval's time does not count in the training speed
def load_model(path, device='cpu', keys=()):  # a checkpoint, or a folder's ckpt.pt -> (model, tokenizer)
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train a model first: python gpt.py")
    try:  # weights_only: tensors and plain values alone, so that loading never runs code
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        model, tokenizer = GPT(GPTConfig(**ckpt['model_args'])), load_tokenizer(ckpt['tokenizer'])
        model.load_state_dict(ckpt['model'])  # do the weights fit the shape?
        tokenizer.decode(range(tokenizer.vocab_size)), [ckpt[k] for k in keys]  # fail here, not later
    except Exception as e:  # pickled objects, a truncated file, another kind of file, a hand edit...
        raise UserError(f"{path} is no whole gpt.py checkpoint ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:80]}...); refusing it, pick another file") from None
    return ckpt if keys else (model.to(device).eval(), tokenizer)  # keys: what resuming needs besides
def read_data():  # meta.json, once the token files' sizes are checked against it
    if not os.path.isfile(f'{data_dir}/train.bin') and data_dir == 'data' and world_size == 1:
        say(f"no {data_dir}/train.bin yet: running prepare.py first")
        if code := subprocess.run([sys.executable, pathlib.Path(__file__).parent / 'prepare.py']).returncode:
            sys.exit(code)  # prepare.py said why
    try:
        meta = json.loads(pathlib.Path(data_dir, 'meta.json').read_text('utf-8'))
        sizes = {s: os.path.getsize(f'{data_dir}/{s}.bin') // 2 for s in ('train', 'val')}  # uint16: 2 bytes
        whole = all(sizes[s] == meta[f'{s}_tokens'] and meta[f'{s}_chars'] > 0 for s in sizes)
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        raise UserError(f"{data_dir}/ holds no whole prepare.py output (train.bin, val.bin and a meta.json "
                        f"that fits them); make it with python prepare.py --data_dir={data_dir}")
    if (n := min(sizes.values())) <= block_size:
        raise UserError(f"--block_size={block_size} needs more than the {n} tokens of the "
                        f"{min(sizes, key=sizes.get)} split; use --block_size={max(1, n - 1)} or less")
    return meta
def parse_args(argv, defaults, source):  # --key=value overrides, typed as the defaults (true/false for bools)
    if {'-h', '--help'} & set(argv):  # each key with its default and its comment in the source file
        notes = dict(re.findall(r"^(\w+) = .*?  # (.*)$", pathlib.Path(source).read_text('utf-8'), re.M))
        sys.exit(say('\n'.join(f"--{f'{k}={v!r}':<33} {notes.get(k, '')}" for k, v in defaults.items())))
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
    here = ['cuda', *(f'cuda:{i}' for i in range(torch.cuda.device_count()))] * torch.cuda.is_available() + \
        ['mps'] * torch.backends.mps.is_available() + ['cpu']
    if name not in here + ['auto']:
        raise UserError(f"--device={name} is not available on this machine; use --device=cpu (or auto)")
    return here[0] if name == 'auto' else name
def setup(overrides):  # settings, device and data, all checked before any work; -> (checkpoint or None, meta)
    global device, dtype, compile, rank, world_size
    globals().update({**DEFAULTS, **overrides})
    found = [p for p in (f'{out_dir}/last.pt', f'{out_dir}/ckpt.pt') if os.path.isfile(p)]  # last.pt first
    keys = ('optimizer', 'scaler', 'iter_num', 'best_val_loss', 'config')  # resuming needs these too
    ckpt = load_model(found[0], keys=keys) if found and init_from == 'resume' else None
    # A resumed run keeps its settings, dtype included; the device and compile are this machine's
    kept = {k: v for k, v in ckpt['config'].items() if type(v) is type(DEFAULTS.get(k))} if ckpt else {}
    globals().update({**kept, **{k: DEFAULTS[k] for k in ('out_dir', 'device', 'compile')}, **overrides})
    device, local_rank, g, capability = pick_device(device), 0, globals(), (0, 0)
    if 'RANK' in os.environ:  # started by torchrun: a process per device; NCCL joins GPUs, gloo CPUs
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if cuda := device.startswith('cuda'):  # a GPU by its index (set_device needs one); GPU_RECIPE's settings
        device = f'cuda:{local_rank}' if device == 'cuda' else device
        capability = torch.cuda.get_device_capability(device)  # 8.0 and up (Ampere...): native bfloat16
        g.update({k: v for k, v in GPU_RECIPE.items() if k not in overrides and not ckpt})
    compile = compile and capability >= (7, 0)  # Triton needs 7.0; the CPU stays eager
    if dtype == 'auto':  # bfloat16 where the GPU has it natively (else float16); on most CPUs both are slow
        dtype = ('bfloat16' if capability >= (8, 0) else 'float16') if cuda else 'float32'
    rules = [(0 < g[k] < math.inf, f'--{k}={g[k]} must be positive') for k in ('eval_interval', 'eval_iters',
             'log_interval', 'batch_size', 'gradient_accumulation_steps', 'block_size', 'n_head', 'n_embd',
             'max_iters', 'lr_decay_iters', 'learning_rate')]  # written so that nan fails too
    rules += [(0 <= g[k] < 2 ** 63, f'--{k}={g[k]} must be zero or more, and finite')
              for k in ('n_layer', 'warmup_iters', 'min_lr', 'weight_decay', 'seed')]
    rules += [(0 <= g[k] < 1, f'--{k}={g[k]} must be in [0, 1)') for k in ('dropout', 'beta1', 'beta2')]
    rules += [(kept.get(k, g[k]) == g[k], f"--{k}={g[k]}, but a resumed run keeps its {kept.get(k)}")
              for k in ('block_size', 'n_layer', 'n_head', 'n_embd', 'weight_decay', 'beta1', 'beta2')]
    rules += [(n_head < 1 or n_embd % n_head == 0, f'--n_embd={n_embd} must be a multiple of --n_head'),
              (grad_clip >= 0, f'--grad_clip={grad_clip} must be zero (no clipping) or more'),
              (warmup_iters <= lr_decay_iters, f'--lr_decay_iters={lr_decay_iters} must be at least '
               f'--warmup_iters={warmup_iters}: the decay follows the warmup'),
              (min_lr <= learning_rate, f'--min_lr={min_lr} must be at most --learning_rate={learning_rate}'),
              (init_from in ('scratch', 'resume'), f'--init_from={init_from} must be scratch or resume'),
              (dtype in ('float32', 'bfloat16', 'float16'), f'--dtype={dtype} must be auto, float32, bfloat16'
               ' or float16'),
              (dtype != 'float16' or cuda, "float16 (--dtype, or a resumed run's) needs a CUDA GPU; use "
               '--dtype=float32 or auto'),
              (out_dir != '', '--out_dir is empty; name a folder'),
              (init_from == 'resume' or not found, f'{out_dir}/ already holds a checkpoint; continue it with '
               '--init_from=resume, or train into a new folder with --out_dir=NAME'),
              (init_from == 'scratch' or found, f'{out_dir}/ holds no checkpoint; use --init_from=scratch'),
              (not ckpt or ckpt['iter_num'] < max_iters, f"{out_dir}/ is at iter {ckpt and ckpt['iter_num']} "
               f"of --max_iters={max_iters}; to train on, resume with larger --max_iters, --lr_decay_iters")]
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
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C and SIGTERM end a script again
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if dist.is_initialized():  # DDP sits in a reference cycle: collect it first, or its group is torn
            gc.collect()  # down at exit while the others are still connected, and the process aborts
            dist.destroy_process_group()
def run_cli(main, argv=None, lower='--batch_size or --block_size, or the model (--n_layer, --n_embd)'):
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character shows '?' instead
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='replace')
    try:  # a mistake to fix, Ctrl-C or too little memory end a script with one line on stderr, no traceback
        main(sys.argv[1:] if argv is None else argv)
    except (UserError, KeyboardInterrupt) as e:  # under torchrun, process 0 speaks for all
        say(f"error: {str(e) or 'stopped by Ctrl-C'}", err=True)
        sys.exit(2 if isinstance(e, UserError) else 130)
    except (MemoryError, RuntimeError) as e:  # torch says "can't allocate" (CPU) or "out of memory" (GPUs)
        if isinstance(e, RuntimeError) and 'allocate' not in str(e):
            raise
        say(f"error: out of memory; lower {lower}", err=True)
        sys.exit(2)

if __name__ == '__main__':
    run_cli(main)
