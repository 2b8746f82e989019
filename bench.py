"""
Benchmarks. Numbers come from real runs on the machine at hand; nothing here is timed by the unit tests.

    python bench.py train [--key=value ...]    # ms/iter, tokens/s, MFU (CUDA) and peak memory of training
    python bench.py target --target_loss=1.47 [--key=value ...]   # wall time until val loss reaches a target
    python bench.py sample [--key=value ...]   # generation tokens/s with and without the KV cache

train and target take every gpt.py setting (--n_layer=6 ...) besides their own keys below.
"""
import resource
import statistics
import sys
import tempfile
import time

import torch

import gpt
from gpt import UserError, parse_args, pick_device, run_cli

TRAIN = {
    'iters': 30,  # timed steps per repeat
    'warmup': 5,  # untimed steps first (and torch.compile, when on)
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


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def setup_gpt(cfg):
    """Configure gpt.py with the gpt settings in cfg (checkpoints, never written here, go to a temp dir)."""
    overrides = {k: v for k, v in cfg.items() if k in gpt.DEFAULTS}
    gpt.setup({'out_dir': tempfile.mkdtemp(prefix='bench-'), **overrides})
    model, optimizer, scaler = gpt.build(gpt.load_tokenizer(gpt.read_meta()['tokenizer']))
    t0 = time.perf_counter()
    step_model = gpt.compiled(model)
    sync(gpt.device)
    return model, step_model, optimizer, scaler, time.perf_counter() - t0


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
    model, step_model, optimizer, scaler, compile_s = setup_gpt(cfg)
    for _ in range(cfg['warmup']):
        gpt.train_step(step_model, optimizer, scaler, gpt.learning_rate)
    times = []
    for _ in range(cfg['repeats']):
        sync(gpt.device)
        t0 = time.perf_counter()
        for _ in range(cfg['iters']):
            loss = gpt.train_step(step_model, optimizer, scaler, gpt.learning_rate)
        loss.item()
        times.append((time.perf_counter() - t0) / cfg['iters'])
    dt = statistics.median(times)
    tokens = gpt.batch_size * gpt.block_size
    n_params = sum(p.numel() for p in model.parameters())
    rows = [('device, dtype', f"{gpt.device}, {gpt.dtype}"), ('parameters', f"{n_params / 1e6:.2f}M"),
            ('tokens per iteration', f"{tokens:,}"), ('ms/iter (median)', f"{dt * 1000:.1f}"),
            ('all repeats, ms/iter', ', '.join(f"{t * 1000:.1f}" for t in times)), ('tokens/s', f"{tokens / dt:,.0f}")]
    if gpt.device.startswith('cuda'):
        # 6 FLOPs per parameter per token (forward and backward), plus attention's q@k and att@v
        flops_per_token = 6 * n_params + 12 * gpt.n_layer * gpt.n_embd * gpt.block_size
        peak = matmul_peak(gpt.device)
        rows += [('compile, s', f"{compile_s:.1f}"), ('bf16 matmul peak, measured', f"{peak / 1e12:.0f} TFLOP/s"),
                 ('MFU', f"{flops_per_token * tokens / dt / peak:.1%}"),
                 ('peak GPU memory', f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")]
    else:
        rows.append(('peak process memory', f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"))
    table(rows)


def bench_target(cfg):
    model, step_model, optimizer, scaler, compile_s = setup_gpt(cfg)
    it, eval_s, t_start = 0, 0.0, time.perf_counter()
    while True:
        if it % gpt.eval_interval == 0 or it == gpt.max_iters:
            t0 = time.perf_counter()
            val = gpt.estimate_loss(model, splits=('val',))['val']
            eval_s += time.perf_counter() - t0
            print(f"iter {it}: val loss {val:.4f} after {time.perf_counter() - t_start:.1f} s")
            if val <= cfg['target_loss'] or it == gpt.max_iters:
                break
        gpt.train_step(step_model, optimizer, scaler, gpt.get_lr(it))
        it += 1
    total = time.perf_counter() - t_start
    table([('target val loss', f"{cfg['target_loss']}"), ('reached', f"{val:.4f}" + ('' if val <= cfg['target_loss'] else ' (missed)')),
           ('iterations', f"{it}"), ('training, s', f"{total - eval_s:.1f}"), ('evaluation, s', f"{eval_s:.1f}"),
           ('wall time, training + eval, s', f"{total:.1f}"), ('compile (before), s', f"{compile_s:.1f}")])


def table(rows):
    width = max(len(k) for k, _ in rows)
    print(f"| {'':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")


def bench_sample(cfg):
    device = pick_device(cfg['device'])
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(cfg['vocab_size'], cfg['block_size'], cfg['n_layer'], cfg['n_head'],
                                  cfg['n_embd'])).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    print(f"generation of {cfg['new_tokens']} tokens on {device}, {cfg['n_layer']} layers x {cfg['n_embd']} wide, "
          f"block {cfg['block_size']}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    results = {}
    for use_cache in (True, False):
        model.generate(prompt, 5, use_cache=use_cache)  # warm-up
        times = []
        for _ in range(cfg['repeats']):
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(prompt, cfg['new_tokens'], use_cache=use_cache,
                                 generator=torch.Generator(device=device).manual_seed(1))
            sync(device)
            times.append(time.perf_counter() - t0)
        results[use_cache] = (statistics.median(times), out)
    print(f"| {'path':<22} | {'seconds':>8} | {'tokens/s':>9} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 11}|")
    for use_cache, name in ((False, 'recompute (no cache)'), (True, 'KV cache')):
        seconds = results[use_cache][0]
        print(f"| {name:<22} | {seconds:>8.2f} | {cfg['new_tokens'] / seconds:>9.1f} |")
    same = torch.equal(results[True][1], results[False][1])
    print(f"speed-up with the cache: {results[False][0] / results[True][0]:.1f}x; same text from both paths: {same}")


def main(argv):
    modes = {'train': ({**gpt.DEFAULTS, **TRAIN}, bench_train), 'target': ({**gpt.DEFAULTS, **TARGET}, bench_target),
             'sample': (SAMPLE, bench_sample)}
    if not argv or argv[0] not in modes:
        raise UserError(f"say what to benchmark: python bench.py {{{'|'.join(modes)}}} [--key=value ...]")
    defaults, run = modes[argv[0]]
    run({**defaults, **parse_args(argv[1:], defaults, gpt.__file__, gpt.CHOICES)})


if __name__ == '__main__':
    run_cli(main)
