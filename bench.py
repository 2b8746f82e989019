"""
Benchmarks. Numbers come from real runs on the machine at hand; nothing here is timed by the unit tests.

    python bench.py sample [--key=value ...]   # generation tokens/s with and without the KV cache
"""
import statistics
import sys
import time

import torch

import gpt
from gpt import UserError, parse_args, pick_device, run_cli

SAMPLE = {  # the reference model (random weights are fine for timing)
    'n_layer': 6, 'n_head': 6, 'n_embd': 384, 'block_size': 256, 'vocab_size': 65,
    'new_tokens': 500,  # tokens generated per timing, from a one-token prompt
    'repeats': 3,  # timings per path; the median is reported
    'device': 'auto',  # 'auto' picks cuda, then mps, then cpu
}


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


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
    modes = {'sample': (SAMPLE, bench_sample)}
    if not argv or argv[0] not in modes:
        raise UserError(f"say what to benchmark: python bench.py {{{'|'.join(modes)}}} [--key=value ...]")
    defaults, run = modes[argv[0]]
    run({**defaults, **parse_args(argv[1:], defaults, __file__)})


if __name__ == '__main__':
    run_cli(main)
