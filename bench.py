"""
Benchmarks and the loss chart. Numbers come from real runs on the machine at hand; nothing here is timed
by the unit tests.

    python bench.py train [--key=value ...]    # ms/iter, tokens/s, MFU (CUDA) and peak memory of training
    python bench.py target --target_loss=1.47 [--key=value ...]   # wall time until val loss reaches a target
    python bench.py sample [--key=value ...]   # generation speed with and without the KV cache
    python bench.py plot --out_dir=out         # out/loss.svg: the train and val loss in out/log.csv
    python bench.py gpu [--dry=true]           # the GPU checks and records; dry: the same steps, tiny, on a CPU

train and target take every gpt.py setting (--n_layer=6 ...) besides their own keys below.
"""
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import gpt
from gpt import UserError, parse_args, pick_device, run_cli

TRAIN = {
    'iters': 30,  # timed steps per repeat
    'warmup': 5,  # untimed steps first (the first one compiles the model when torch.compile is on)
    'repeats': 3,  # the median of the repeats is reported
}
TARGET = {
    'target_loss': 1.47,  # stop at the first eval whose val loss is at or below this
}
SAMPLE = {  # the reference model (random weights are fine for timing)
    'n_layer': 6, 'n_head': 6, 'n_embd': 384, 'block_size': 256, 'vocab_size': 65,
    'new_tokens': 500,  # tokens generated per timing, from a one-token prompt
    'repeats': 3,  # timings per path; the median is reported
    'device': 'auto',  # 'auto' picks cuda, then mps, then cpu
}
PLOT = {
    'out_dir': 'out',  # the run whose log.csv is drawn, into loss.svg beside it
}
GPU = {
    'dry': False,  # true: every step at a tiny size on the CPU, to check the script itself
}
# The reference model (10.7M parameters) with nanoGPT's Shakespeare recipe: what the GPU records measure.
REFERENCE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, learning_rate=1e-3,
                 min_lr=1e-4, max_iters=5000, lr_decay_iters=5000, warmup_iters=100, eval_interval=250,
                 eval_iters=7, device='cuda')


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def setup_gpt(cfg):
    """Configure gpt.py with the gpt settings in cfg (its out_dir, never written, is a temporary folder), build
    the model and time its first step: with torch.compile on, that step compiles it."""
    _, meta = gpt.setup({**{k: v for k, v in cfg.items() if k in gpt.DEFAULTS}, 'out_dir': tempfile.mkdtemp()})
    model, optimizer, scaler = gpt.build(meta['vocab_size'])
    step_model = torch.compile(model) if gpt.compile and gpt.device.startswith('cuda') else model
    t0 = time.perf_counter()
    gpt.train_step(step_model, optimizer, scaler, 0)
    sync(gpt.device)
    return meta, model, step_model, optimizer, scaler, time.perf_counter() - t0


def matmul_peak(device):
    """The device's own bfloat16 matmul throughput, measured (FLOP/s): the denominator of MFU."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync(device)
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t0)


def bench_train(cfg):
    _, model, step_model, optimizer, scaler, first_s = setup_gpt(cfg)
    for it in range(1, cfg['warmup']):
        gpt.train_step(step_model, optimizer, scaler, it)
    times, it = [], cfg['warmup']
    for _ in range(cfg['repeats']):
        sync(gpt.device)
        t0 = time.perf_counter()
        for _ in range(cfg['iters']):
            loss = gpt.train_step(step_model, optimizer, scaler, it)
            it += 1
        loss.item()
        times.append((time.perf_counter() - t0) / cfg['iters'])
    dt = statistics.median(times)
    tokens = gpt.batch_size * gpt.block_size * gpt.gradient_accumulation_steps
    n_params = sum(p.numel() for p in model.parameters())
    rows = [('device, dtype', f"{gpt.device}, {gpt.dtype}"), ('parameters', f"{n_params / 1e6:.2f}M"),
            ('tokens per iteration', f"{tokens:,}"), ('ms/iter (median)', f"{dt * 1000:.1f}"),
            ('all repeats, ms/iter', ', '.join(f"{t * 1000:.1f}" for t in times)), ('tokens/s', f"{tokens / dt:,.0f}")]
    if gpt.device.startswith('cuda'):
        # 6 FLOPs per parameter per token (forward and backward), plus attention's q@k and att@v
        flops_per_token = 6 * n_params + 12 * gpt.n_layer * gpt.n_embd * gpt.block_size
        peak = matmul_peak(gpt.device)
        rows += [('first step (compiles when on), s', f"{first_s:.1f}"), ('bf16 matmul peak, measured', f"{peak / 1e12:.0f} TFLOP/s"),
                 ('MFU', f"{flops_per_token * tokens / dt / peak:.1%}"),
                 ('peak GPU memory', f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")]
    else:
        rows.append(('peak process memory', f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"))
    table(rows)


def bench_target(cfg):
    meta, model, step_model, optimizer, scaler, compile_s = setup_gpt(cfg)
    it, eval_s, t_start = 1, 0.0, time.perf_counter()  # setup_gpt took step 0, and its time is compile_s
    while True:
        if it % gpt.eval_interval == 0 or it == gpt.max_iters:
            t0 = time.perf_counter()
            val = gpt.estimate_loss(model, meta, splits=('val',))['val']
            eval_s += time.perf_counter() - t0
            print(f"iter {it}: val loss {val:.4f} after {time.perf_counter() - t_start:.1f} s")
            if val <= cfg['target_loss'] or it == gpt.max_iters:
                break
        gpt.train_step(step_model, optimizer, scaler, it)
        it += 1
    total = time.perf_counter() - t_start
    table([('target val loss', f"{cfg['target_loss']}"), ('reached', f"{val:.4f}" + ('' if val <= cfg['target_loss'] else ' (missed)')),
           ('iterations', f"{it}"), ('training, s', f"{total - eval_s:.1f}"), ('evaluation, s', f"{eval_s:.1f}"),
           ('wall time, training + eval, s', f"{total:.1f}"), ('first step, compile included, s', f"{compile_s:.1f}")])


def table(rows):
    width = max(len(k) for k, _ in rows)
    print(f"| {'':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")


def bench_sample(cfg):
    from sample import sample, stop_check  # here: the other benchmarks do without sample.py
    device, n = pick_device(cfg['device']), cfg['new_tokens']
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
    print(f"| {'path':<40} | {'seconds':>8} | {'tokens/s':>9} | {'ms/token':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, s in seconds.items():
        print(f"| {name:<40} | {s:>8.2f} | {n / s:>9.1f} | {s / n * 1000:>8.2f} |")
    recompute, cached, floor = (seconds[k] for k in ('recompute (no cache)', 'KV cache', 'one-token forwards (the floor)'))
    print(f"speed-up with the cache: {recompute / cached:.1f}x (recompute / floor, the most a cache could give "
          f"here: {recompute / floor:.1f}x)")
    print(f"a cached step takes {cached / floor:.2f}x a bare one-token forward")
    print(f"with repetition penalty + stop text: {cached / seconds['KV cache, repetition penalty + stop text']:.0%} "
          "of the tokens/s")
    print(f"same text from both paths: {torch.equal(outs['KV cache'], outs['recompute (no cache)'])}")


def bench_plot(cfg):
    """out_dir/loss.svg: the train and val loss at each eval of out_dir/log.csv, drawn with the standard
    library. A resumed run appends to log.csv, repeating the steps lost with the interrupted run: the latest
    row of each step is the one that counts."""
    path = os.path.join(cfg['out_dir'], 'log.csv')
    try:
        with open(path, newline='', encoding='utf-8') as f:
            evals = {int(r['iter']): (float(r['train_loss']), float(r['val_loss'])) for r in csv.DictReader(f)
                     if r['val_loss']}
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} cannot be read as a gpt.py log ({e}); train into --out_dir first") from None
    if not evals:
        raise UserError(f"{path} holds no eval yet; plot it after the first eval")
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
    with open(svg, 'w', encoding='utf-8') as f:
        f.write('\n'.join(out) + '\n')
    print(f"wrote {svg}: {len(its)} evals, best val loss {evals[best][1]:.4f} at iter {best}")


def bench_gpu(cfg):
    """The GPU checks and records, in one go: 1) the CUDA unit tests, 2) training speed at the reference
    size with and without torch.compile, 3) time to val loss 1.47 with the reference recipe, 4) generation
    speed with and without the KV cache. dry=true runs the same steps at a tiny size on the CPU."""
    if cfg['dry']:
        size = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=8, device='cpu', eval_iters=2)
        ref, train, target = {**REFERENCE, **size}, {'iters': 3, 'warmup': 2, 'repeats': 1}, \
            {'target_loss': 4.0, 'max_iters': 20, 'lr_decay_iters': 20, 'eval_interval': 10, 'warmup_iters': 5}
        sample = {**SAMPLE, 'n_layer': 2, 'n_head': 2, 'n_embd': 64, 'block_size': 32, 'new_tokens': 40,
                  'repeats': 1, 'device': 'cpu'}
    else:
        pick_device('cuda')  # one line, not a traceback, where there is no GPU
        ref, train, target, sample = REFERENCE, {}, {}, {**SAMPLE, 'device': 'cuda'}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if ref['device'] == 'cuda' else 'CPU (dry run)'}")
    print("\n## 1. CUDA unit tests")
    tests = subprocess.run([sys.executable, '-m', 'unittest', '-v', 'test_gpt.TestCUDA'],
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    for compile_ in (True, False):
        print(f"\n## 2. bench.py train at the reference size, compile={compile_}")
        bench_train({**gpt.DEFAULTS, **TRAIN, **ref, **train, 'compile': compile_})
    print("\n## 3. bench.py target at the reference recipe")
    bench_target({**gpt.DEFAULTS, **TARGET, **ref, **target})
    print("\n## 4. bench.py sample")
    bench_sample(sample)
    if tests.returncode:
        raise UserError("some CUDA unit tests failed: see their output above")


def main(argv):
    modes = {'train': ({**gpt.DEFAULTS, **TRAIN}, bench_train), 'target': ({**gpt.DEFAULTS, **TARGET}, bench_target),
             'sample': (SAMPLE, bench_sample), 'plot': (PLOT, bench_plot), 'gpu': (GPU, bench_gpu)}
    if not argv or argv[0] not in modes:
        raise UserError(f"say what to run: python bench.py {{{'|'.join(modes)}}} [--key=value ...]")
    defaults, run = modes[argv[0]]
    run({**defaults, **parse_args(argv[1:], defaults, __file__ if argv[0] in ('plot', 'gpu') else gpt.__file__)})


if __name__ == '__main__':
    run_cli(main)
