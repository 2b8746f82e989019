"""
Benchmarks, the loss chart and the attention picture. Numbers come from real runs on the machine at hand;
nothing here is timed by the unit tests.

    python bench.py train [--key=value ...]    # ms/iter, tokens/s, MFU and peak memory of training steps
    python bench.py target [--key=value ...]   # seconds from `python gpt.py ...` starting to a val loss target
    python bench.py sample [--key=value ...]   # generation speed with and without the KV cache
    python bench.py plot --out_dir=out         # out/loss.svg: the train and val loss in out/log.csv
    python bench.py attention --out_dir=out    # out/attention.svg: what each attention head reads in --start
    python bench.py gpu [--dry=true]           # every GPU figure in one table, each against its target

train and target take every gpt.py setting too (--n_layer=6 ...) but out_dir and init_from: they train a
new model, with a temporary folder (deleted after) for its files and for torch.compile's cache, so that
each compile is timed from cold. `python bench.py --help` lists each mode's own keys.
"""
import contextlib, csv, datetime, html, itertools, math, os, pathlib, platform, re, statistics, subprocess, sys, \
    tempfile, threading, time, traceback  # noqa: E401

import torch

import gpt
from gpt import UserError, parse_args, pick_device, run_cli

TRAIN = {
    'iters': 30,  # timed steps per repeat
    'warmup': 5,  # untimed steps first; the first one, timed apart, compiles the model where gpt.py does
    'repeats': 3,  # timings; the median is reported
}
TARGET = {
    'target_loss': 1.47,  # stop gpt.py at the first eval whose val loss is at or below this
    'limit_s': 900.0,  # or after this many seconds: the target is missed
}
REFERENCE = {**gpt.GPU_RECIPE, 'device': 'cuda'}  # the model and schedule that the GPU figures are about
SAMPLE = {  # the reference model, with random weights: the timing does not depend on them
    **{k: REFERENCE[k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size')},
    'vocab_size': 65,  # Tiny Shakespeare's characters
    'new_tokens': 500,  # tokens generated per timing, from a one-token prompt
    'repeats': 3,  # timings; the median is reported
    'device': 'auto',  # 'auto' picks cuda, then mps, then cpu
}
PLOT = {
    'out_dir': 'out',  # the training run's folder: the picture is drawn from its files, into an SVG beside them
}
ATTENTION = {
    'out_dir': 'out',  # the training run's folder: the picture is drawn from its files, into an SVG beside them
    'start': 'ROMEO: But soft',  # the prompt whose attention is drawn (its last 64 tokens, or block_size, at most)
}
GPU = {
    'dry': False,  # true: every step at a tiny size on the CPU, to check the script itself (CI does)
}
# `bench.py gpu` runs the card's command, with a time limit: python gpt.py --n_layer=6 --device=cuda
CARD = {'n_layer': 6, 'device': 'cuda', 'limit_s': 120}
# `bench.py gpu --dry=true`: every step this small, on the CPU; the card's command evaluates every 10 steps
# and reaches val loss 3.6 (from about 4.2) by iter 10 on Tiny Shakespeare
DRY = {'n_layer': 1, 'n_head': 2, 'n_embd': 32, 'block_size': 32, 'batch_size': 8, 'device': 'cpu'}
DRY_CARD = {**DRY, 'max_iters': 1000, 'lr_decay_iters': 1000, 'warmup_iters': 5, 'eval_interval': 10,
            'eval_iters': 2, 'log_interval': 5, 'target_loss': 3.6, 'limit_s': 60}


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


@contextlib.contextmanager
def scratch_folder():
    """A temporary folder, deleted afterwards, that also holds torch.compile's cache for this process and
    the ones it starts: a compile timed in it starts cold, as on a new machine."""
    old = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    with tempfile.TemporaryDirectory() as tmp:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = os.path.join(tmp, 'compile-cache')
        try:
            yield tmp
        finally:
            del os.environ['TORCHINDUCTOR_CACHE_DIR']
            if old is not None:
                os.environ['TORCHINDUCTOR_CACHE_DIR'] = old


def matmul_peak(device, dtype):
    """The device's own matmul throughput in the training dtype, measured (FLOP/s): the denominator of MFU."""
    n = 8192 if device.startswith('cuda') else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync(device)
    return 20 * 2 * n ** 3 / (time.perf_counter() - t0)


def peak_process_memory():
    """The process's peak resident memory in bytes where the system tells it in /proc (Linux), else None."""
    try:
        return int(re.search(r'^VmHWM:\s+(\d+) kB', pathlib.Path('/proc/self/status').read_text(), re.M)[1]) * 1024
    except (OSError, TypeError):
        return None


def bench_train(cfg):
    """Training steps of a new model in this process: the first one (it compiles the model where gpt.build
    does) timed apart, then the median ms/iter of the repeats. Prints a table; returns its figures."""
    with scratch_folder() as tmp:
        _, meta = gpt.setup({**{k: v for k, v in cfg.items() if k in gpt.DEFAULTS}, 'out_dir': f'{tmp}/out'})
        model, optimizer = gpt.build(meta['vocab_size'])
        cuda = gpt.device.startswith('cuda')
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gpt.train_step(model, optimizer, 0).item()  # .item() waits for the device
        first_s = time.perf_counter() - t0
        for it in range(1, cfg['warmup']):
            gpt.train_step(model, optimizer, it)
        times, it = [], max(1, cfg['warmup'])
        for _ in range(cfg['repeats']):
            sync(gpt.device)
            t0 = time.perf_counter()
            for _ in range(cfg['iters']):
                loss = gpt.train_step(model, optimizer, it)
                it += 1
            loss.item()
            times.append((time.perf_counter() - t0) / cfg['iters'])
    dt = statistics.median(times)
    tokens = gpt.batch_size * gpt.block_size * gpt.gradient_accumulation_steps
    n_params = sum(p.numel() for p in model.parameters())
    # 6 FLOPs per parameter per token (forward and backward), plus attention's q@k and att@v
    flops_per_token = 6 * n_params + 12 * gpt.n_layer * gpt.n_embd * gpt.block_size
    mfu = flops_per_token * tokens / dt / matmul_peak(gpt.device, getattr(torch, gpt.dtype))
    peak = torch.cuda.max_memory_allocated() if cuda else peak_process_memory()
    peak_gib = None if peak is None else peak / 2 ** 30
    table(['', 'value'], [
        ['device, dtype, compiled', f"{gpt.device}, {gpt.dtype}, {gpt.compile}"],
        ['parameters', f"{n_params / 1e6:.2f}M"], ['tokens per iteration', f"{tokens:,}"],
        ['first step (compiles when compiled), s', f"{first_s:.1f}"], ['ms/iter (median)', f"{dt * 1000:.1f}"],
        ['all repeats, ms/iter', ', '.join(f"{t * 1000:.1f}" for t in times)], ['tokens/s', f"{tokens / dt:,.0f}"],
        ['MFU (of the measured matmul peak)', f"{mfu:.1%}"],
        [f"peak {'GPU' if cuda else 'process'} memory, GiB", '-' if peak_gib is None else f"{peak_gib:.2f}"]])
    return {'ms': dt * 1000, 'first_s': first_s, 'mfu': mfu * 100, 'peak_gib': peak_gib}


def bench_target(cfg):
    """Run `python gpt.py` with the gpt.py settings given, as a user would (its out_dir a temporary folder),
    and stop it at the first eval whose val loss is at or below target_loss. Each line it prints is echoed
    with its arrival time, in seconds from the start of the process. Prints a table; returns its figures."""
    args = [f'--{k}={v}' for k, v in cfg.items() if k in gpt.DEFAULTS]
    print(f"python gpt.py {' '.join(args)}, stopped at val loss <= {cfg['target_loss']}")
    found, last = {}, ''
    with scratch_folder() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, gpt.__file__, *args, f'--out_dir={tmp}/out'], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, 'PYTHONUNBUFFERED': '1'})  # each line as it is printed
        timer = threading.Timer(cfg['limit_s'], proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                t, last = time.perf_counter() - t0, line.rstrip('\n')
                print(f"{t:7.2f} s  {last}", flush=True)
                found.setdefault('first_line_s', t)
                if step := re.match(r'iter (\d+)/\d+: loss ', last):
                    found.setdefault('first_step_s', t)
                    found.setdefault('first_step_iter', int(step[1]))
                if evaluated := re.match(r'iter (\d+): train loss \S+, val loss (\S+),', last):
                    found['iter'], found['val'] = int(evaluated[1]), float(evaluated[2])
                    if found['val'] <= cfg['target_loss']:
                        found['target_s'] = t
                        break
        finally:
            timer.cancel()
            proc.kill()  # nothing to save: the folder goes
            code = proc.wait()
            proc.stdout.close()
    if code == 2 and 'target_s' not in found:  # gpt.py refused a setting: its one line says why
        raise UserError(last.removeprefix('error: '))
    end = f"reached at iter {found['iter']} (val loss {found['val']:.4f})" if 'target_s' in found else \
        f"not reached in {cfg['limit_s']:g} s" if code == -9 else f"not reached: gpt.py ended with exit code {code}"
    table(['', 'seconds from the start'], [[name, f"{found[key]:.1f}" if key in found else '-'] for name, key in (
        ('first output line', 'first_line_s'),
        (f"first step line (iter {found.get('first_step_iter', '-')}, compile included)", 'first_step_s'),
        (f"val loss <= {cfg['target_loss']}: {end}", 'target_s'))])
    return found


def table(header, rows):  # a Markdown table, each column as wide as its widest cell
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ['-' * w for w in widths], *rows]:
        print('| ' + ' | '.join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + ' |')


def bench_sample(cfg):
    from sample import sample, stop_check  # here: the other benchmarks do without sample.py
    device, n = pick_device(cfg['device']), cfg['new_tokens']
    torch.set_float32_matmul_precision('highest')  # float32 matmuls, as sample.py has them (gpt.setup sets TF32)
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(cfg['vocab_size'], cfg['block_size'], cfg['n_layer'], cfg['n_head'],
                                  cfg['n_embd'])).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    print(f"generation of {n} tokens on {device}, {cfg['n_layer']} layers x {cfg['n_embd']} wide, "
          f"block {cfg['block_size']}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    tokenizer = gpt.CharTokenizer([chr(ord('!') + i) for i in range(cfg['vocab_size'])])
    stopped = stop_check(tokenizer, tokenizer.decode(range(8)), prompt.shape[1])  # a stop text that never comes

    def generate(**options):
        return lambda: sample(model, prompt, n, generator=torch.Generator(device).manual_seed(1), **options)

    def bare_forwards():  # n one-token forwards without a cache: the least that n cached steps can cost
        with torch.inference_mode():
            for _ in range(n):
                model(prompt)

    paths = {'recompute (no cache)': generate(use_cache=False), 'KV cache': generate(),
             'KV cache, repetition penalty + stop text': generate(repetition_penalty=1.3, stopped=stopped),
             'one-token forwards (the floor)': bare_forwards}
    times, outs = {name: [] for name in paths}, {}
    for run in paths.values():
        run()  # warm-up
    for _ in range(cfg['repeats']):  # interleaved, so that noise on the machine hits every path alike
        for name, run in paths.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    table(['path', 'seconds', 'tokens/s', 'ms/token'],
          [[name, f"{s:.2f}", f"{n / s:.1f}", f"{s / n * 1000:.2f}"] for name, s in seconds.items()])
    recompute, cached, floor = (seconds[k] for k in ('recompute (no cache)', 'KV cache',
                                                     'one-token forwards (the floor)'))
    same = torch.equal(outs['KV cache'], outs['recompute (no cache)'])
    print(f"speed-up with the cache: {recompute / cached:.1f}x (recompute / floor, the most a cache could give "
          f"here: {recompute / floor:.1f}x)")
    print(f"a cached step takes {cached / floor:.2f}x a bare one-token forward")
    print(f"with repetition penalty + stop text: {cached / seconds['KV cache, repetition penalty + stop text']:.0%} "
          "of the tokens/s")
    print(f"same text from both paths: {same}")
    return {'tokens_per_s': n / cached, 'speedup': recompute / cached, 'same_text': same}


def bench_plot(cfg):
    """out_dir/loss.svg: the train and val loss at each eval of out_dir/log.csv, drawn with the standard
    library. A resumed run appends to log.csv, repeating the steps lost with the interrupted run: the latest
    row of each step is the one that counts."""
    path = os.path.join(cfg['out_dir'], 'log.csv')
    try:  # utf-8-sig: a file saved by a spreadsheet may begin with a byte-order mark; strict: a lone quote fails
        with open(path, newline='', encoding='utf-8-sig') as f:
            rows = list(csv.DictReader(f, strict=True))
        if any(None in r or None in r.values() for r in rows):  # too many or too few cells
            raise ValueError('a row does not have the columns of the header')
        evals = {int(r['iter']): (float(r['train_loss']), float(r['val_loss'])) for r in rows if r['val_loss']}
    except (OSError, KeyError, ValueError, csv.Error) as e:
        raise UserError(f"{path} cannot be read as a gpt.py log ({e}); train into --out_dir first") from None
    skipped = [i for i in evals if not all(map(math.isfinite, evals[i]))]  # a nan or inf loss has no place
    evals = {i: losses for i, losses in evals.items() if i not in skipped}
    if not evals:
        raise UserError(f"{path} holds no eval with finite losses yet; plot it after the first eval")
    its = sorted(evals)
    lo, hi = min(min(evals[i]) for i in its), max(max(evals[i]) for i in its)
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 0.1 else (lo, hi)
    W, H, left, right, top, bottom = 640, 400, 60, 20, 20, 50  # canvas and margins, in pixels
    x = lambda it: left + (W - left - right) * it / max(its[-1], 1)  # noqa: E731
    y = lambda v: top + (H - top - bottom) * (hi - v) / (hi - lo)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<path d="M{left},{top} V{H - bottom} H{W - right}" fill="none" stroke="black"/>']
    for i in range(6):  # six ticks on each axis
        it, v = its[-1] * i / 5, lo + (hi - lo) * i / 5
        out += [f'<text x="{x(it):.1f}" y="{H - bottom + 16}" text-anchor="middle">{it:.0f}</text>',
                f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>',
                f'<path d="M{x(it):.1f},{H - bottom} v4 M{left},{y(v):.1f} h-4" stroke="black"/>']
    out += [f'<text x="{(W + left) / 2}" y="{H - 12}" text-anchor="middle">iteration</text>',
            f'<text transform="translate(16,{(H - bottom) / 2}) rotate(-90)" text-anchor="middle">loss</text>']
    for k, (name, color) in enumerate((('train', '#1f77b4'), ('val', '#d62728'))):
        points = ' '.join(f'{x(i):.1f},{y(evals[i][k]):.1f}' for i in its)
        out += [f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>',
                f'<text x="{W - right - 90}" y="{top + 16 + 18 * k}" fill="{color}">— {name} loss</text>']
    best = min(its, key=lambda i: evals[i][1])
    out += [f'<circle cx="{x(best):.1f}" cy="{y(evals[best][1]):.1f}" r="5" fill="none" stroke="black"/>',
            f'<text x="{x(best) - 8:.1f}" y="{y(evals[best][1]) - 10:.1f}" text-anchor="end">best val '
            f'{evals[best][1]:.4f}</text></svg>']
    svg = os.path.join(cfg['out_dir'], 'loss.svg')
    try:
        with open(svg, 'w', encoding='utf-8') as f:
            f.write('\n'.join(out) + '\n')
    except OSError as e:
        raise UserError(f"cannot write {svg} ({e.strerror or e}); make {cfg['out_dir']}/ writable, or copy "
                        "log.csv into a folder that is and plot that one") from None
    print(f"wrote {svg}: {len(its)} evals, best val loss {evals[best][1]:.4f} at iter {best}"
          + (f"; left out the evals at iter {', '.join(map(str, sorted(skipped)))}: a loss of nan or inf" if skipped
             else ''))


# `bench.py attention`: what each head reads. A pattern maps the prompt's tokens (their texts) to a (T, T)
# mask: row t marks the one earlier token that the pattern reads from token t (no mark: none to read). These
# are the patterns that the default model's heads showed on Shakespeare.
def tokens_back(k):
    return lambda texts: torch.ones(len(texts), len(texts), dtype=torch.bool).tril(-k).triu(-k)  # s = t - k


def last_newline(texts):  # the latest newline before token t: where the line of t begins
    mask = torch.zeros(len(texts), len(texts), dtype=torch.bool)
    newline = None
    for t, text in enumerate(texts):
        if newline is not None:
            mask[t, newline] = True
        if '\n' in text:
            newline = t
    return mask


PATTERNS = {'previous token': tokens_back(1), '2 tokens back': tokens_back(2), '3 tokens back': tokens_back(3),
            'the last newline': last_newline}
MOST_TOKENS = 64  # the longest prompt whose heatmaps stay legible


def attention_weights(model, idx):
    """The attention weights of every head on the tokens idx (1, T): (n_layer, nh, T, T), where row t holds
    how much token t reads each token s <= t. They are the model's own: each Head runs its written-out math
    (softmax of q.k / sqrt(hs) under the causal mask) for this forward, and a hook on its dropout keeps what
    goes in, the weights themselves (in eval mode dropout changes nothing)."""
    weights = []

    def keep(module, inputs, output):
        weights.append(inputs[0][0])  # (nh, T, T): the batch's one row

    hooks = []
    for block in model.blocks:
        block.attn.heads.flash = False
        hooks.append(block.attn.heads.dropout.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for block, hook in zip(model.blocks, hooks):
            block.attn.heads.flash = model.config.flash
            hook.remove()
    return torch.stack(weights)


def caption(wei, texts):
    """What one head (wei: its (T, T) weights) mostly does: a pattern, and the share of the head's weight that
    goes to the pattern's token, averaged over the rows where the pattern has one (row 0 aside: the first token
    can only read itself). A pattern names the head only if it gets a fifth of the weight or more, and 3 times
    what chance would give it: an even spread, 1 / (t + 1) on each token 0..t. A head that no pattern names
    spreads its weight out; its share then says how much of each row lies as an even spread would put it."""
    even = torch.ones_like(wei).tril() / torch.arange(1, len(texts) + 1)[:, None]  # (T, T)
    shares = {}
    for name, pattern in PATTERNS.items():
        mask = pattern(texts)[1:]
        rows = mask.any(dim=1)
        if rows.any():
            share = (wei[1:] * mask).sum(dim=1)[rows].mean().item()
            chance = (even[1:] * mask).sum(dim=1)[rows].mean().item()
            if share >= max(0.2, 3 * chance):
                shares[name] = share
    if not shares:
        return 'spread evenly', torch.minimum(wei, even)[1:].sum(dim=1).mean().item()
    best = max(shares, key=shares.get)
    return best, shares[best]


def visible(text):  # a token's text as a label: space and newline shown, other unprintables escaped
    shown = {' ': '␣', '\n': '⏎', '\t': '⇥'}
    return ''.join(shown.get(c, c if c.isprintable() else c.encode('unicode_escape').decode()) for c in text)


def draw_attention(weights, texts, captions, notes):
    """An SVG of the weights (n_layer, nh, T, T): a heatmap per head, layers down and heads across, with the
    tokens' texts on both axes, each head's caption under it, and the lines of notes above. Each run of cells
    of one shade in a row is one line of a path, one path per shade: 36 heads of 64 x 64 cells as an element
    each would take 6 MB. Above the diagonal, grey: a token cannot read later ones."""
    L, nh, T, _ = weights.shape
    shades = [f'#{round(255 - 247 * i / 15):02x}{round(255 - 207 * i / 15):02x}{round(255 - 148 * i / 15):02x}'
              for i in range(16)]  # white to dark blue, for weights 0 to 1
    levels = (weights * 15).round().int().tolist()
    labels = [html.escape(visible(text)) for text in texts]
    cell = max(10, min(16, 320 // T))  # pixels per cell, and the labels' font a little smaller
    font = cell - 2
    wide = round(max(len(visible(text)) for text in texts) * font * 0.62 + 4)  # room for the longest label
    upright = wide < cell + 4  # one-character labels stand under their columns; longer ones are turned
    side = T * cell  # of a heatmap
    under = font + 4 if upright else wide
    panel_w, panel_h = max(wide + side, 240) + 24, 18 + side + under + 36
    top = 20 * len(notes) + 40
    W, H = 10 + nh * panel_w, top + L * panel_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']
    out += [f'<text x="10" y="{20 + 20 * i}">{html.escape(line)}</text>' for i, line in enumerate(notes)]
    out += [f'<rect x="{90 + 12 * i}" y="{top - 30}" width="12" height="12" fill="{shade}"/>'
            for i, shade in enumerate(shades)]
    out += [f'<text x="10" y="{top - 20}">weight: 0</text>', f'<text x="{96 + 12 * 16}" y="{top - 20}">1</text>']
    for l, h in itertools.product(range(L), range(nh)):
        name, share = captions[l][h]
        out += [f'<g transform="translate({10 + h * panel_w},{top + l * panel_h})">',
                f'<text y="12">layer {l + 1}, head {h + 1}</text>',
                f'<text y="{18 + side + under + 16}">{name} {share:.0%}</text>',
                f'<rect x="{wide}" y="18" width="{side}" height="{side}" fill="#ddd"/>']
        # Token i names row i (on the left) and column i (below).
        out.append(f'<g font-family="monospace" font-size="{font}" text-anchor="end">')
        out += [f'<text x="{wide - 3}" y="{18 + (i + 0.5) * cell + font * 0.35:.1f}">{label}</text>'
                for i, label in enumerate(labels)]
        if upright:
            out += [f'<text x="{wide + (i + 0.5) * cell:.1f}" y="{18 + side + font + 2}" text-anchor="middle">'
                    f'{label}</text>' for i, label in enumerate(labels)]
        else:
            out += [f'<text transform="translate({wide + (i + 0.5) * cell + font * 0.35:.1f},{18 + side + 3}) '
                    f'rotate(-90)">{label}</text>' for i, label in enumerate(labels)]
        # The cells, in units of a cell: a line from (s, t) n cells long covers cells s..s+n-1 of row t.
        lines = {}  # shade -> its lines
        for t in range(T):
            s = 0
            for level, run in itertools.groupby(levels[l][h][t][:t + 1]):
                n = len(list(run))
                lines.setdefault(level, []).append(f'M{s} {t}h{n}')
                s += n
        out.append(f'</g><g transform="translate({wide},{18 + cell / 2}) scale({cell})" fill="none" '
                   f'stroke-width="1" shape-rendering="crispEdges" data-head="{l},{h}">')
        out += [f'<path stroke="{shades[level]}" d="{"".join(runs)}"/>' for level, runs in sorted(lines.items())]
        out.append('</g></g>')
    return '\n'.join(out + ['</svg>']) + '\n'


def bench_attention(cfg):
    """out_dir/attention.svg: every head's attention on the prompt --start, drawn with the standard library,
    and its caption for each head printed as a table. The weights are those of ckpt.pt, or of last.pt in a
    run that has no ckpt.pt yet."""
    path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if not os.path.isfile(path) and os.path.isfile(os.path.join(cfg['out_dir'], 'last.pt')):
        path = os.path.join(cfg['out_dir'], 'last.pt')
    model, tokenizer = gpt.load_model(path, 'cpu')
    if model.config.n_layer == 0:  # not an error: there is just nothing to draw
        print(f"{path} has no attention to draw: it is a bigram model (n_layer=0); each prediction sees only its "
              "own token and position")
        return
    text = cfg['start']
    if isinstance(tokenizer, gpt.CharTokenizer):  # BPE encodes any text
        unknown = sorted(set(text) - tokenizer.stoi.keys())
        if unknown:
            raise UserError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; remove them")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise UserError(f"--start={text!r} is too short: give 2 tokens or more, so that one has another to read")
    most = min(MOST_TOKENS, model.config.block_size)
    kept = ids[-most:]
    texts = [tokenizer.decode([i]) for i in kept]  # each token's own text, for the labels
    # The note decodes the tokens together, so that a character that BPE cut into bytes shows whole there.
    notes = [f"Attention of {path} on \"{visible(tokenizer.decode(kept))}\": row t, how much token t reads "
             "each token s."]
    if len(kept) < len(ids):
        notes.append(f"The prompt has {len(ids)} tokens: only its last {most} are shown (the most that "
                     f"{'the model sees at once, block_size' if most < MOST_TOKENS else 'stay legible'}).")
    weights = attention_weights(model, torch.tensor([kept]))
    captions = [[caption(head, texts) for head in layer] for layer in weights]
    svg = os.path.join(cfg['out_dir'], 'attention.svg')
    try:
        with open(svg, 'w', encoding='utf-8') as f:
            f.write(draw_attention(weights, texts, captions, notes))
    except OSError as e:
        raise UserError(f"cannot write {svg} ({e.strerror or e}); make {cfg['out_dir']}/ writable") from None
    print('\n'.join(notes))
    rows = [[l + 1, h + 1, f"{name} {share:.0%}"] for l, layer in enumerate(captions)
            for h, (name, share) in enumerate(layer)]
    table(['layer', 'head', 'mostly reads'], rows)
    print(f"wrote {svg} ({os.path.getsize(svg) / 1000:.0f} kB)")


def time_startup(device):
    """Seconds that `python -c "import torch"` takes, and how much longer it takes to also put a first tensor
    on the device (CUDA's initialization). The faster of two runs each: the first may read a cold disk."""
    def seconds(code):
        def once():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, '-c', code], check=True)
            return time.perf_counter() - t0
        return min(once(), once())
    import_s = seconds('import torch')
    init_s = seconds(f"import torch; torch.zeros(1, device='{device}')") - import_s
    print(f"import torch: {import_s:.2f} s; a first tensor on {device}: {init_s:.2f} s more")
    return {'import_s': import_s, 'init_s': init_s}


COMPILE_TEST = 'test_compiled_and_eager_training_give_close_losses'


def cuda_tests():
    """test_gpt.TestCUDA, in a process of its own: how many ran, passed and were skipped (all of them without
    a GPU), and how the test of compiled against eager training ended."""
    done = subprocess.run([sys.executable, '-m', 'unittest', '-v', 'test_gpt.TestCUDA'], capture_output=True,
                          text=True, timeout=150, cwd=os.path.dirname(os.path.abspath(__file__)))
    print(done.stderr.strip())  # unittest reports on stderr
    ran = int(re.search(r'^Ran (\d+) tests?', done.stderr, re.M)[1])
    failed = set(re.findall(r'^(?:FAIL|ERROR): (\w+)', done.stderr, re.M))
    skipped = sum(int(n) for n in re.findall(r'skipped=(\d+)', done.stderr.splitlines()[-1]))
    compiled = 'not found' if COMPILE_TEST not in done.stderr else 'failed' if COMPILE_TEST in failed else \
        'skipped' if skipped == ran else 'passed'
    return {'ran': ran, 'passed': ran - len(failed) - skipped, 'skipped': skipped, 'compiled': compiled}


def attempt(title, step, *args):  # a step of `bench.py gpu`: its figures, or {} (and why) if it failed
    print(f"\n## {title}")
    try:
        return step(*args)
    except (Exception, SystemExit):  # the other steps still run, and the table still comes
        traceback.print_exc()
        return {}


def bench_gpu(cfg):
    """Every figure of the GPU records in one table, each with its target, from one run: on an H200 about 4
    minutes, under 7 at most (startup ~20 s, the card's command <= 120 s, training ~70 s, generation ~25 s,
    the CUDA unit tests <= 150 s). The card's command runs first, so that nothing before it warms a cache.
    dry=true runs every step at a tiny size on the CPU: the figures mean nothing, the script is checked."""
    dry = cfg['dry']
    device = 'cpu' if dry else pick_device('cuda')  # one line, not a traceback, where there is no GPU
    name = f"{platform.processor() or 'a CPU'} (a dry run)" if dry else torch.cuda.get_device_name()
    print(f"bench.py gpu on {name}, torch {torch.__version__}{'' if dry else f' (CUDA {torch.version.cuda})'}, "
          f"Python {platform.python_version()}, {datetime.date.today()}")
    if dry:
        ref, card = {**REFERENCE, **DRY}, {**TARGET, **DRY_CARD}
        train, gen = {'iters': 3, 'warmup': 2, 'repeats': 1}, {**DRY, 'new_tokens': 40, 'repeats': 1}
    else:
        ref, card, train, gen = REFERENCE, {**TARGET, **CARD}, {}, {}
    startup = attempt('Startup: python -c "import torch", then with a first tensor', time_startup, device)
    run = attempt(f"The card's command, compiling from cold, stopped at val loss <= {card['target_loss']}",
                  bench_target, card)
    compiled, eager = (attempt(f'Training steps at the reference size, compile={c}', bench_train,
                               {**TRAIN, **ref, **train, 'compile': c}) for c in (True, False))
    gen = attempt('Generation with and without the KV cache', bench_sample, {**SAMPLE, 'device': device, **gen})
    tests = attempt('The CUDA unit tests (test_gpt.TestCUDA)', cuda_tests)

    def row(figure, value, fmt='.1f', most=None, least=None, note='', absent='failed'):  # against its target
        target = f"<= {most:,g}" if most is not None else f">= {least:,g}" if least is not None else ''
        met = value is not None and (most is None or value <= most) and (least is None or value >= least)
        return [figure, absent if value is None else format(value, fmt), f"{target} {note}".strip(),
                ('met' if met else 'MISSED') if target else '']
    rows = [
        row('training step at the reference size, compiled, ms/iter', compiled.get('ms'), most=12,
            note='(nanoGPT: 17.8)'),
        row('training step, eager, ms/iter', eager.get('ms')),
        row('first step, compiling from a cold cache, s', compiled.get('first_s'), most=10),
        row('MFU, compiled, % of the measured matmul peak', compiled.get('mfu')),
        row('peak memory, compiled, GiB', compiled.get('peak_gib'), '.2f'),
        row('python -c "import torch", s', startup.get('import_s'), '.2f'),
        row(f"{device} initialization (a first tensor), s", startup.get('init_s'), '.2f'),
        row("card's command: first output line, s", run.get('first_line_s')),
        row(f"card's command: first step line (iter {run.get('first_step_iter', '?')}, compile included), s",
            run.get('first_step_s')),
        row(f"card's command: val loss <= {card['target_loss']}, s", run.get('target_s'),
            most=card['limit_s'] if dry else 30, note='' if dry else '(nanoGPT: 96)',
            absent=f"not reached (last eval: iter {run['iter']}, val {run['val']:.4f})" if 'val' in run else 'failed'),
        row('generation with the KV cache, batch 1, tokens/s', gen.get('tokens_per_s'), ',.0f', least=3000),
        row('KV cache speed-up over recompute, x', gen.get('speedup'), least=2)]
    t, same = tests, gen.get('same_text')
    passed = f"{t['passed']} of {t['ran']}" + (f", {t['skipped']} skipped" if t['skipped'] else '') if t else 'failed'
    exact = [  # figure, value, target, ok: True, False, or None where not run (TestCUDA skips without a GPU)
        ['CUDA unit tests (test_gpt.TestCUDA) passed', passed, 'all',
         None if t and t['skipped'] == t['ran'] else bool(t) and t['passed'] == t['ran']],
        ['KV cache and recompute give the same text', {True: 'yes', False: 'no', None: 'failed'}[same], 'yes',
         bool(same)],
        ['compiled and eager losses within tolerance (TestCUDA)', t.get('compiled', 'failed'), 'passed',
         None if t.get('compiled') == 'skipped' else t.get('compiled') == 'passed']]
    rows += [[*cells, {True: 'met', False: 'MISSED', None: 'not run'}[ok]] for *cells, ok in exact]
    print(f"\n## All figures{' (a dry run: they check the script, not the GPU)' if dry else ''}")
    table(['figure', 'value', 'target', ''], rows)
    broken = [figure for figure, _, _, ok in exact if ok is False]
    if {} in (startup, run, compiled, eager, gen, tests):
        broken.append('a step failed: see its traceback above')
    if broken:
        sys.exit(f"error: {'; '.join(broken)}")


def usage(modes):  # --help: what each mode does, then its own keys with their defaults and meanings
    notes = {}
    for path, pattern in ((gpt.__file__, r"^(\w+) = .*?  # (.*)$"), (__file__, r"^    '(\w+)': .*?,  # (.*)$")):
        notes.update(re.findall(pattern, pathlib.Path(path).read_text('utf-8'), re.M))
    print(__doc__.strip())
    for mode, (defaults, _) in modes.items():
        print(f"\n{mode}:" + (' (and gpt.py\'s settings: python gpt.py --help)' if mode in ('train', 'target') else ''))
        print('\n'.join(f"  --{f'{k}={v!r}':<31} {notes.get(k, '')}" for k, v in defaults.items()))


def check(cfg):  # bench.py's own settings (gpt.setup checks gpt.py's): one line that names the fix
    rules = [(cfg[k] >= 1, f"--{k}={cfg[k]} must be 1 or more")
             for k in ('iters', 'repeats', 'new_tokens', 'n_head', 'n_embd', 'block_size', 'vocab_size') if k in cfg]
    rules += [(cfg[k] >= 0, f"--{k}={cfg[k]} must be 0 or more") for k in ('warmup', 'n_layer') if k in cfg]
    rules += [(0 < cfg[k] < float('inf'), f"--{k}={cfg[k]} must be positive") for k in ('target_loss', 'limit_s')
              if k in cfg]
    rules += [(cfg[k] < 1 or cfg['n_embd'] % cfg[k] == 0, f"--n_embd={cfg['n_embd']} must be a multiple of "
               f"--n_head={cfg[k]}; use an --n_head that divides it") for k in ('n_head',) if k in cfg]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def main(argv):
    modes = {'train': (TRAIN, bench_train), 'target': (TARGET, bench_target), 'sample': (SAMPLE, bench_sample),
             'plot': (PLOT, bench_plot), 'attention': (ATTENTION, bench_attention), 'gpu': (GPU, bench_gpu)}
    if {'-h', '--help'} & set(argv):
        return usage(modes)
    if not argv or argv[0] not in modes:
        raise UserError(f"say what to run: python bench.py {{{'|'.join(modes)}}} [--key=value ...]; --help says more")
    own, run = modes[argv[0]]
    both = argv[0] in ('train', 'target')  # these take the gpt.py settings too
    given = parse_args(argv[1:], {**gpt.DEFAULTS, **own} if both else own, __file__)
    if both and (kept := {'out_dir', 'init_from'} & given.keys()):
        raise UserError(f"--{min(kept)}: bench.py {argv[0]} trains a new model in a temporary folder; drop it")
    check({k: given.get(k, v) for k, v in own.items()})
    run({**own, **given})


if __name__ == '__main__':
    run_cli(main)
