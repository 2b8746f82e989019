"""
Tests: each states a property of a GPT or of its scripts. Fast (CPU, tiny models), no network, no input.txt.

    python -m unittest test_gpt
"""
import argparse
import contextlib
import csv
import io
import math
import multiprocessing
import os
import pathlib
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import unittest
from unittest import mock
from xml.etree import ElementTree

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gpt
import prepare
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ''.join(f"{w} the {n} of {v}.\n" for w, n, v in zip(
    ['Sing', 'Tell', 'Speak', 'Weep', 'Laugh', 'Dream', 'Fight'] * 20,
    ['song', 'tale', 'truth', 'grief', 'joy', 'night', 'war', 'sea'] * 20,
    ['kings', 'queens', 'fools', 'gods', 'men', 'stars', 'ships', 'wolves', 'fields'] * 20))


def tiny_model(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout)).eval()


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def output_of(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _as_main(script, args, out_prefix):
    """Child process: run `script` exactly as `python script args...` would, its output into files."""
    for fd, suffix in ((1, '.out'), (2, '.err')):
        os.dup2(os.open(out_prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(HERE, script), run_name='__main__')


def run_many(cases, folder):
    """Run each (script, args) in its own process, like run() but forked from a server that has imported
    torch once, instead of spending 1.5 s on that import per case. Returns (exit code, stdout, stderr) each."""
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(['torch', 'gpt', 'prepare', 'sample'])
    results = []
    for i, (script, args) in enumerate(cases):
        for suffix in ('.out', '.err'):  # exist even if the child dies before writing
            open(os.path.join(folder, f'{i}{suffix}'), 'w').close()
        proc = ctx.Process(target=_as_main, args=(script, args, os.path.join(folder, str(i))))
        proc.start()
        proc.join(60)
        with open(os.path.join(folder, f'{i}.out')) as out, open(os.path.join(folder, f'{i}.err')) as err:
            results.append((proc.exitcode, out.read(), err.read()))
    return results


class DataDirTest(unittest.TestCase):
    """A temporary folder holding a small corpus and the token files prepare.py made from it."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.input = os.path.join(self.dir, 'input.txt')
        with open(self.input, 'w', encoding='utf-8') as f:
            f.write(TEXT)
        self.data_dir = os.path.join(self.dir, 'data')
        self.meta = quiet(prepare.prepare, self.input, self.data_dir)

    def train_args(self, out='out', **overrides):
        args = dict(data_dir=self.data_dir, out_dir=os.path.join(self.dir, out), batch_size=4, block_size=16,
                    n_layer=2, n_head=2, n_embd=32, max_iters=12, lr_decay_iters=12, warmup_iters=2,
                    eval_interval=6, eval_iters=2, log_interval=1, device='cpu')
        args.update(overrides)
        return [f'--{k}={v}' for k, v in args.items()]


class TestTokenizerAndData(DataDirTest):

    def test_tokenizer_round_trip(self):
        tok = gpt.load_tokenizer(self.meta['tokenizer'])
        self.assertEqual(tok.decode(tok.encode(TEXT)), TEXT)
        self.assertEqual(tok.vocab_size, len(set(TEXT)))

    def test_unknown_character_is_a_clear_error(self):
        tok = gpt.load_tokenizer(self.meta['tokenizer'])
        with self.assertRaisesRegex(gpt.UserError, "'Zé'"):
            tok.encode('Zé')

    def test_prepare_writes_first_90_percent_to_train_and_rest_to_val_as_uint16(self):
        tok = gpt.load_tokenizer(self.meta['tokenizer'])
        train = np.fromfile(os.path.join(self.data_dir, 'train.bin'), dtype=np.uint16)
        val = np.fromfile(os.path.join(self.data_dir, 'val.bin'), dtype=np.uint16)
        self.assertEqual(os.path.getsize(os.path.join(self.data_dir, 'train.bin')), 2 * len(train))
        n_train = int(len(TEXT) * 0.9)
        self.assertEqual(tok.decode(train.tolist()), TEXT[:n_train])
        self.assertEqual(tok.decode(val.tolist()), TEXT[n_train:])
        self.assertEqual((self.meta['train_tokens'], self.meta['val_tokens']), (len(train), len(val)))

    def test_offline_prepare_says_how_to_get_tiny_shakespeare(self):
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        os.remove('input.txt')
        with mock.patch.object(prepare.urllib.request, 'urlopen', side_effect=OSError('no network')), \
                self.assertRaisesRegex(gpt.UserError, r'download failed .* save https://\S+ as input.txt by hand'):
            quiet(prepare.main, [])
        self.assertFalse(os.path.exists('input.txt'))

    def test_prepare_reads_in_chunks_with_the_same_result(self):
        with mock.patch.object(prepare, 'CHUNK', 7):
            quiet(prepare.prepare, self.input, os.path.join(self.dir, 'chunked'))
        for split in ('train.bin', 'val.bin'):
            with open(os.path.join(self.data_dir, split), 'rb') as a, open(os.path.join(self.dir, 'chunked', split), 'rb') as b:
                self.assertEqual(a.read(), b.read())

    def test_get_batch_targets_are_inputs_shifted_by_one(self):
        with mock.patch.multiple(gpt, data_dir=self.data_dir, batch_size=5, block_size=12, device='cpu'):
            x, y = gpt.get_batch('train')
        self.assertEqual(x.shape, (5, 12))
        self.assertEqual(y.shape, (5, 12))
        self.assertTrue(torch.equal(x[:, 1:], y[:, :-1]))
        train = np.fromfile(os.path.join(self.data_dir, 'train.bin'), dtype=np.uint16)
        text = gpt.load_tokenizer(self.meta['tokenizer']).decode(train.tolist())
        tok = gpt.load_tokenizer(self.meta['tokenizer'])
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            self.assertIn(tok.decode(row_x + row_y[-1:]), text)  # a real window of the train split

    def test_eval_covers_fixed_windows_and_equals_a_plain_loop(self):
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16)
        with mock.patch.multiple(gpt, data_dir=self.data_dir, batch_size=3, block_size=16, eval_iters=100,
                                 device='cpu', dtype='float32'):
            starts = gpt.eval_starts('val')
            self.assertEqual(len(starts), (self.meta['val_tokens'] - 1) // 16)  # the whole val split
            losses = gpt.estimate_loss(model)
            plain = [model(*gpt.batch_at('val', [s]))[1].item() for s in starts]
        self.assertAlmostEqual(losses['val'], sum(plain) / len(plain), places=5)
        self.assertFalse(model.training)  # estimate_loss leaves the model in the mode it found it in


class TestBPE(DataDirTest):

    def bpe(self, vocab_size=300):
        meta = quiet(prepare.prepare, self.input, os.path.join(self.dir, 'bpe'), 'bpe', vocab_size)
        return meta, gpt.load_tokenizer(meta['tokenizer'])

    def test_bpe_round_trips_any_unicode_text(self):
        _, tok = self.bpe()
        for text in (TEXT[:300], 'Ünïcödé — 漢字, emoji 🙂, tabs\tand\r\nnewlines', ''.join(map(chr, range(32, 900)))):
            self.assertEqual(tok.decode(tok.encode(text)), text)

    def test_bpe_decodes_any_ids_replacing_broken_utf8(self):
        _, tok = self.bpe()
        ids = torch.randint(tok.vocab_size, (500,), generator=torch.Generator().manual_seed(0)).tolist()
        self.assertIsInstance(tok.decode(ids), str)
        self.assertEqual(tok.decode(list('é'.encode('utf-8'))[:1]), '\ufffd')  # half a character

    def test_bpe_merges_shorten_the_text_and_overlapping_pairs_merge_left_to_right(self):
        meta, tok = self.bpe()
        self.assertEqual(meta['vocab_size'], 300)
        self.assertLess(len(tok.encode(TEXT)), 0.6 * len(TEXT.encode('utf-8')))
        self.assertEqual(gpt.merge(np.array([7, 7, 7, 1, 7, 7]), (7, 7), 9).tolist(), [9, 7, 1, 9])

    def test_bpe_encode_of_the_train_text_equals_the_tokens_prepare_wrote(self):
        meta, tok = self.bpe()
        train = np.fromfile(os.path.join(self.dir, 'bpe', 'train.bin'), dtype=np.uint16).tolist()
        val = np.fromfile(os.path.join(self.dir, 'bpe', 'val.bin'), dtype=np.uint16).tolist()
        self.assertEqual(train, tok.encode(TEXT[:meta['train_chars']]))
        self.assertEqual(val, tok.encode(TEXT[meta['train_chars']:]))

    def test_bits_per_char_is_loss_over_ln2_for_characters_and_scaled_by_tokens_per_char_for_bpe(self):
        self.assertAlmostEqual(gpt.bits_per_char(1.5, self.meta), 1.5 / math.log(2))
        meta, _ = self.bpe()
        self.assertAlmostEqual(gpt.bits_per_char(1.5, meta), 1.5 / math.log(2) * meta['val_tokens'] / meta['val_chars'])

    def test_a_bpe_model_trains_resumes_and_samples_from_any_start_text(self):
        self.bpe()
        data = os.path.join(self.dir, 'bpe')
        quiet(gpt.main, self.train_args(data_dir=data, max_iters=6))
        log = output_of(gpt.main, self.train_args(data_dir=data) + ['--init_from=resume'])
        self.assertRegex(log, r'val \d\.\d+ bits/char')
        self.assertEqual(torch.load(os.path.join(self.dir, 'out', 'last.pt'), weights_only=True)['iter_num'], 12)
        out = output_of(sample.main, [f"--out_dir={self.dir}/out", '--start=Zebras über 🙂', '--num_samples=2',
                                      '--max_new_tokens=10'])
        self.assertEqual(out.count('Zebras über 🙂'), 2)
        out = output_of(sample.main, [f"--out_dir={self.dir}/out", '--start=Zebras über 🙂', '--num_samples=1',
                                      '--max_new_tokens=10'])
        self.assertTrue(out.startswith('Zebras über 🙂'), out)
        for stream in ('1', '3'):  # the stop text ends each sample, wherever BPE cut it into tokens
            out = output_of(sample.main, [f"--out_dir={self.dir}/out", '--start=Zebras', '--stop=e', '--num_samples=' + stream,
                                          '--max_new_tokens=80', '--temperature=2'])
            for text in out.split('-' * 20 + ' sample ')[1:] if stream == '3' else [out]:
                generated = text.split('Zebras', 1)[1].rstrip('\n')
                self.assertEqual(generated.count('e'), 1, generated)
                self.assertTrue(generated.endswith('e'), generated)


class TestModel(unittest.TestCase):

    def test_loss_at_init_is_about_ln_vocab_size(self):
        model = tiny_model(vocab_size=65, block_size=32)
        idx = torch.randint(65, (8, 32))
        _, loss = model(idx, torch.randint(65, (8, 32)))
        self.assertAlmostEqual(loss.item(), math.log(65), delta=0.1)

    def test_logits_do_not_depend_on_future_tokens(self):
        model = tiny_model()
        idx = torch.randint(11, (2, 8))
        changed = idx.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 11
        a, b = model(idx)[0], model(changed)[0]
        self.assertTrue(torch.allclose(a[:, :5], b[:, :5], atol=1e-6))
        self.assertFalse(torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3))

    def test_fused_attention_equals_explicit_heads(self):
        torch.manual_seed(0)
        n_embd, n_head, T = 24, 3, 10
        mha = gpt.MultiHeadAttention(n_embd, n_head, dropout=0.0).eval()
        hs = n_embd // n_head
        heads = [gpt.Head(n_embd, hs, block_size=T, dropout=0.0).eval() for _ in range(n_head)]
        wq, wk, wv = mha.qkv.weight.split(n_embd, dim=0)  # rows of the fused projection, head by head
        for h, head in enumerate(heads):
            head.query.weight.data = wq[h * hs:(h + 1) * hs]
            head.key.weight.data = wk[h * hs:(h + 1) * hs]
            head.value.weight.data = wv[h * hs:(h + 1) * hs]
        x = torch.randn(2, T, n_embd)
        explicit = mha.proj(torch.cat([head(x) for head in heads], dim=-1))
        self.assertTrue(torch.allclose(mha(x), explicit, atol=1e-5))

    def test_fused_adamw_takes_the_same_steps_as_the_plain_one(self):
        weights = []
        for fused in (True, False):
            model = tiny_model().train()
            with mock.patch.multiple(gpt, device='cpu', learning_rate=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.99):
                opt = gpt.configure_optimizer(model)
            for group in opt.param_groups:
                group['fused'], group['foreach'] = fused, False
            for step in range(3):
                idx = torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(step))
                model(idx, idx)[1].backward()
                opt.step()
                opt.zero_grad()
            weights.append(model.state_dict())
        for key in weights[0]:
            self.assertTrue(torch.allclose(weights[0][key], weights[1][key], atol=1e-6), key)

    def test_lm_head_is_tied_to_token_embedding_and_residual_projections_are_scaled(self):
        model = tiny_model(n_layer=8, n_embd=64)
        self.assertIs(model.lm_head.weight, model.tok_emb.weight)
        std = model.blocks[0].attn.proj.weight.std().item()
        self.assertAlmostEqual(std, 0.02 / math.sqrt(16), delta=0.002)

    def test_tiny_model_overfits_a_short_text(self):
        torch.manual_seed(0)
        tok = gpt.CharTokenizer(sorted(set(TEXT)))
        data = torch.tensor(tok.encode(TEXT[:200]))
        model = tiny_model(vocab_size=tok.vocab_size, block_size=32, n_embd=32).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(200):
            ix = torch.randint(len(data) - 32, (16,))
            x = torch.stack([data[i:i + 32] for i in ix])
            y = torch.stack([data[i + 1:i + 33] for i in ix])
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.assertLess(loss.item(), 0.5)  # from ln(vocab) = 3.3

    def test_lr_warms_up_from_above_zero_then_decays_to_min_lr(self):
        with mock.patch.multiple(gpt, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100):
            lrs = [gpt.get_lr(it) for it in range(120)]
        self.assertGreater(lrs[0], 0)
        self.assertEqual(max(lrs), lrs[10])
        self.assertTrue(all(a >= b for a, b in zip(lrs[10:], lrs[11:])))
        self.assertEqual(lrs[-1], 0.1)


class TestGeneration(unittest.TestCase):

    def test_kv_cache_matches_full_recompute(self):
        model = tiny_model(block_size=16)
        idx = torch.randint(11, (3, 4))
        cache = gpt.KVCache(len(model.blocks))
        for _ in range(12):  # stays inside the window
            cached, full = model.next_logits(idx, cache), model(idx)[0][:, -1]
            self.assertTrue(torch.allclose(cached, full, atol=1e-5))
            idx = torch.cat((idx, cached.argmax(-1, keepdim=True)), dim=1)

    def test_cached_and_recomputed_generation_give_the_same_text_past_block_size(self):
        model = tiny_model(block_size=8)
        idx = torch.randint(11, (2, 3))
        texts = [model.generate(idx, 40, use_cache=c, generator=torch.Generator().manual_seed(7)) for c in (True, False)]
        self.assertEqual(texts[0].shape, (2, 43))
        self.assertTrue(torch.equal(texts[0], texts[1]))

    def test_generation_past_block_size_sees_a_window_of_the_latest_tokens(self):
        model = tiny_model(block_size=8)
        idx = torch.randint(11, (1, 3))
        out = model.generate(idx, 30, temperature=0)
        for t in range(3, out.shape[1]):  # every token is the argmax over its own context window
            start = model.window_start(t)
            self.assertTrue(min(t, 5) <= t - start <= 8)
            self.assertEqual(out[0, t].item(), model(out[:, start:t])[0][0, -1].argmax().item())

    def test_top_k_1_sampling_is_deterministic(self):
        model = tiny_model()
        idx = torch.zeros((1, 1), dtype=torch.long)
        runs = [model.generate(idx, 20, top_k=1, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        self.assertTrue(torch.equal(runs[0], runs[1]))
        self.assertTrue(torch.equal(runs[0], model.generate(idx, 20, temperature=0)))

    def test_same_seed_same_sample_other_seed_other_sample(self):
        model = tiny_model()
        idx = torch.zeros((2, 1), dtype=torch.long)
        a, b, c = (sample.sample(model, idx, 30, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
        self.assertTrue(torch.equal(a, b))
        self.assertFalse(torch.equal(a, c))

    def test_top_k_keeps_only_the_k_likeliest_tokens_with_renormalized_probabilities(self):
        logits = torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0]])
        kept = sample.filter_logits(logits, logits.long()[:, :0], 1.0, 2, 1.0, 1.0)
        probs = torch.softmax(kept, -1)
        expected = torch.softmax(torch.tensor([4.0, 3.0]), -1)
        self.assertTrue(torch.allclose(probs[0, [1, 3]], expected))
        self.assertEqual(probs[0, [0, 2, 4]].sum().item(), 0.0)

    def test_top_p_keeps_the_smallest_set_reaching_p(self):
        probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
        kept = torch.softmax(sample.filter_logits(probs.log(), probs.long()[:, :0], 1.0, 100, 0.8, 1.0), -1)
        self.assertTrue(torch.allclose(kept, torch.tensor([[0.5 / 0.8, 0.0, 0.3 / 0.8, 0.0]])))  # 0.5 + 0.3 reach 0.8
        kept = torch.softmax(sample.filter_logits(probs.log(), probs.long()[:, :0], 1.0, 100, 0.81, 1.0), -1)
        self.assertEqual((kept > 0).sum().item(), 3)

    def test_temperature_sharpens_or_flattens_the_distribution(self):
        logits = torch.tensor([[2.0, 1.0, 0.0]])
        empty = logits.long()[:, :0]
        for t in (0.5, 1.0, 2.0):
            probs = torch.softmax(sample.filter_logits(logits, empty, t, 100, 1.0, 1.0), -1)
            self.assertTrue(torch.allclose(probs, torch.softmax(logits / t, -1)))
        cold, hot = (torch.softmax(sample.filter_logits(logits, empty, t, 100, 1.0, 1.0), -1)[0, 0] for t in (0.5, 2.0))
        self.assertGreater(cold, hot)

    def test_length_penalty_decides_between_finished_beams_of_different_lengths(self):
        model = tiny_model(seed=4)
        idx = torch.zeros((1, 1), dtype=torch.long)
        stop_token = model.generate(idx, 1, temperature=0)[0, 1].item()

        def ends(ids):  # a beam is finished once it produces the greedy first token again, after step 1
            return (ids[:, 2:] == stop_token).any(dim=1)
        lengths = {lp: sample.beam_search(model, idx, 12, beams=6, length_penalty=lp, stopped=ends).shape[1]
                   for lp in (0.0, 3.0)}
        self.assertLess(lengths[0.0], lengths[3.0])  # by total log-probability the shortest wins; / length**3, a long one

    def test_repetition_penalty_makes_seen_tokens_less_likely(self):
        logits = torch.tensor([[2.0, -1.0, 2.0, -1.0]])
        seen = torch.tensor([[0, 1]])
        out = sample.filter_logits(logits, seen, 1.0, 100, 1.0, 2.0)
        self.assertTrue(torch.equal(out, torch.tensor([[1.0, -2.0, 2.0, -1.0]])))

    def test_temperature_zero_is_greedy_and_deterministic(self):
        model = tiny_model()
        idx = torch.zeros((1, 1), dtype=torch.long)
        a = sample.sample(model, idx, 25, temperature=0)
        b = sample.sample(model, idx, 25, temperature=0, generator=torch.Generator().manual_seed(99))
        self.assertTrue(torch.equal(a, b))
        self.assertTrue(torch.equal(a, model.generate(idx, 25, temperature=0)))

    def test_stop_text_ends_a_sample(self):
        model = tiny_model()
        idx = torch.zeros((1, 1), dtype=torch.long)
        free = sample.sample(model, idx, 40, temperature=0)
        stop = free[0, 10:12].tolist()  # two tokens the free run produces
        first = next(i for i in range(1, 41) if free[0, i - 1:i + 1].tolist() == stop)
        stopped = sample.sample(model, idx, 40, temperature=0,
                                stopped=lambda ids: (ids[:, -2:] == torch.tensor(stop)).all(dim=1))
        self.assertEqual(stopped.shape[1], first + 1)
        self.assertEqual(stopped[0, -2:].tolist(), stop)

    def test_a_single_sample_streams_each_token_as_it_is_made(self):
        model = tiny_model()
        seen = []
        out = sample.sample(model, torch.zeros((1, 1), dtype=torch.long), 15, on_token=lambda idx: seen.append(idx.shape[1]))
        self.assertEqual(seen, list(range(2, 17)))
        self.assertEqual(out.shape, (1, 16))

    def test_beam_search_with_one_beam_is_greedy(self):
        model = tiny_model()
        idx = torch.randint(11, (1, 3))
        self.assertTrue(torch.equal(sample.beam_search(model, idx, 20, beams=1), model.generate(idx, 20, temperature=0)))

    def test_beam_search_finds_a_likelier_text_than_greedy(self):
        model = tiny_model(seed=3)
        idx = torch.randint(11, (1, 2))

        def logprob(seq):
            logits = model(seq[:, :-1])[0]
            return torch.log_softmax(logits, -1)[0, 1:].gather(1, seq[0, 2:, None]).sum().item()
        greedy, beam = model.generate(idx, 6, temperature=0), sample.beam_search(model, idx, 6, beams=8)
        self.assertGreaterEqual(logprob(beam), logprob(greedy) - 1e-6)


class TestCheckpointAndConfig(DataDirTest):

    def test_checkpoint_round_trip_gives_identical_logits_and_loads_weights_only(self):
        quiet(gpt.main, self.train_args(max_iters=3, lr_decay_iters=3))
        path = os.path.join(self.dir, 'out', 'ckpt.pt')
        ckpt = torch.load(path, weights_only=True)
        self.assertEqual(ckpt['tokenizer'], self.meta['tokenizer'])
        model, tok = gpt.load_model(os.path.join(self.dir, 'out'))
        fresh = gpt.GPT(gpt.GPTConfig(**ckpt['model_args'])).eval()
        fresh.load_state_dict(ckpt['model'])
        idx = torch.tensor([tok.encode('Sing the song')])
        self.assertTrue(torch.equal(model(idx)[0], fresh(idx)[0]))
        self.assertFalse(any(k.startswith('_orig_mod') for k in ckpt['model']))

    def test_cli_overrides_parse_by_the_defaults_type(self):
        defaults = {'n_layer': 4, 'dropout': 0.1, 'compile': True, 'start': 'x'}
        self.assertEqual(gpt.parse_args(['--n_layer=6', '--dropout=0', '--compile=false', '--start=a=b'], defaults, gpt.__file__),
                         {'n_layer': 6, 'dropout': 0.0, 'compile': False, 'start': 'a=b'})
        self.assertEqual(gpt.parse_args(['--compile=1', '--dropout', '1e-1'], defaults, gpt.__file__),
                         {'compile': True, 'dropout': 0.1})

    def test_cli_rejects_unknown_keys_with_a_suggestion_and_wrong_types(self):
        with self.assertRaisesRegex(gpt.UserError, "did you mean --n_layer"):
            gpt.parse_args(['--n_layers=6'], gpt.DEFAULTS, gpt.__file__)
        with self.assertRaisesRegex(gpt.UserError, "--n_layer: invalid int value: '2.5'"):
            gpt.parse_args(['--n_layer=2.5'], gpt.DEFAULTS, gpt.__file__)
        with self.assertRaisesRegex(gpt.UserError, "--compile"):
            gpt.parse_args(['--compile=maybe'], gpt.DEFAULTS, gpt.__file__)

    def test_help_lists_every_key_with_default_and_meaning(self):
        out = run('gpt.py', '--help').stdout
        for key in gpt.DEFAULTS:
            self.assertIn(f'--{key}', out)
        self.assertIn('how many independent sequences', out)
        self.assertIn('(default: 1337)', out)

    def test_importing_gpt_has_no_side_effects(self):
        with tempfile.TemporaryDirectory() as empty:
            r = subprocess.run([sys.executable, '-c', 'import gpt, prepare, sample'], cwd=empty, capture_output=True,
                               text=True, env={**os.environ, 'PYTHONPATH': HERE})
            self.assertEqual((r.returncode, r.stdout, r.stderr, os.listdir(empty)), (0, '', '', []))

    def test_end_to_end_prepare_train_sample(self):
        r = run('prepare.py', f'--input={self.input}', f'--data_dir={self.dir}/data2')
        self.assertEqual(r.returncode, 0, r.stderr)
        r = run('gpt.py', *self.train_args(out='e2e', data_dir=f'{self.dir}/data2', max_iters=4, lr_decay_iters=4))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('val loss', r.stdout)
        r = run('sample.py', f'--out_dir={self.dir}/e2e', '--start=Sing the', '--num_samples=2', '--max_new_tokens=20')
        self.assertEqual(r.returncode, 0, r.stderr)
        samples = r.stdout.split('-' * 20 + ' sample ')[1:]
        self.assertEqual(len(samples), 2)
        for s in samples:
            self.assertTrue(s.split('\n', 1)[1].startswith('Sing the'))
        with open(f'{self.dir}/prompt.txt', 'w', encoding='utf-8') as f:
            f.write('Sing the')
        r = run('sample.py', f'--out_dir={self.dir}/e2e', f'--start=FILE:{self.dir}/prompt.txt', '--num_samples=1',
                '--max_new_tokens=20')
        self.assertTrue(r.stdout.startswith('Sing the') and len(r.stdout) > len('Sing the') + 10, r.stdout)



def snapshot(folder):
    """Every file under folder with its bytes, to prove that nothing was changed."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), 'rb') as f:
                files[os.path.join(root, name)] = f.read()
    return files


class TestReliability(DataDirTest):

    def test_resume_is_bit_exact(self):
        def losses(log):
            return re.findall(r"iter (\d+)/\d+: loss (\S+),", log)
        full = output_of(gpt.main, self.train_args(out='full', dropout=0.1))
        first = output_of(gpt.main, self.train_args(out='split', dropout=0.1, max_iters=6))
        second = output_of(gpt.main, self.train_args(out='split', dropout=0.1) + ['--init_from=resume'])
        self.assertIn('resuming at iter 6', second)
        self.assertEqual(len(losses(full)), 12)
        self.assertEqual(losses(full), losses(first) + losses(second))
        a, b = (torch.load(os.path.join(self.dir, d, 'last.pt'), weights_only=True) for d in ('full', 'split'))
        self.assertEqual(a['iter_num'], 12)
        for key in a['model']:
            self.assertTrue(torch.equal(a['model'][key], b['model'][key]), key)

    def test_a_save_that_fails_halfway_leaves_the_previous_checkpoint_loadable(self):
        path = os.path.join(self.dir, 'ckpt.pt')
        gpt.save_checkpoint({'w': torch.ones(3)}, path)

        def dies_halfway(obj, f):
            f.write(b'PK half a zip file')
            raise OSError('disk full')
        with mock.patch.object(torch, 'save', dies_halfway), self.assertRaises(OSError):
            gpt.save_checkpoint({'w': torch.zeros(3)}, path)
        self.assertTrue(torch.equal(torch.load(path, weights_only=True)['w'], torch.ones(3)))
        self.assertNotIn('ckpt.pt.tmp', os.listdir(self.dir))

    def test_unsafe_or_broken_checkpoints_are_refused_with_a_reason(self):
        quiet(gpt.main, self.train_args(max_iters=2, lr_decay_iters=2))
        good = os.path.join(self.dir, 'out', 'ckpt.pt')
        ckpt = torch.load(good, weights_only=True)
        with open(good, 'rb') as f:
            data = f.read()
        cases = [('pickled Python objects', lambda p: torch.save({**ckpt, 'extra': argparse.Namespace(x=1)}, p)),
                 ('not a readable checkpoint', lambda p: pathlib.Path(p).write_bytes(data[:len(data) // 2])),  # truncated
                 ('not a readable checkpoint', lambda p: pathlib.Path(p).write_text('just some text')),
                 ('not a gpt.py checkpoint', lambda p: torch.save({'weights': torch.ones(2)}, p))]
        for i, (reason, write) in enumerate(cases):
            path = os.path.join(self.dir, f'{i}.pt')
            write(path)
            with self.subTest(reason), self.assertRaisesRegex(gpt.UserError, reason):
                gpt.load_model(path)

    def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(self):
        quiet(gpt.main, self.train_args(max_iters=6))
        checkpoints = [os.path.join(self.dir, 'out', name) for name in ('ckpt.pt', 'last.pt')]
        before = [pathlib.Path(p).read_bytes() for p in checkpoints]
        real_forward = gpt.GPT.forward

        def nan_after_step_7(model, idx, targets=None, cache=None):
            logits, loss = real_forward(model, idx, targets, cache)
            nan_after_step_7.calls += model.training
            return logits, loss * float('nan') if nan_after_step_7.calls > 1 else loss
        nan_after_step_7.calls = 0
        with mock.patch.object(gpt.GPT, 'forward', nan_after_step_7), self.assertRaises(SystemExit) as stop:
            quiet(gpt.main, self.train_args() + ['--init_from=resume'])
        self.assertRegex(str(stop.exception.code), r"loss is nan at iter 8.*--learning_rate")
        self.assertEqual([pathlib.Path(p).read_bytes() for p in checkpoints], before)

    def test_sigint_and_sigterm_save_a_resumable_checkpoint(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            out = os.path.join(self.dir, sig.name)
            proc = subprocess.Popen([sys.executable, '-u', os.path.join(HERE, 'gpt.py'),
                                     *self.train_args(out=sig.name, max_iters=100000, lr_decay_iters=100000)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for line in proc.stdout:  # until training is under way (or the output ends: the asserts say why)
                if line.startswith('iter 3/'):
                    break
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 128 + sig, stderr)
            self.assertIn(f'stopped by {sig.name}', stdout)
            self.assertIn('--init_from=resume', stdout)
            self.assertNotIn('Traceback', stderr)
            ckpt = gpt.load_checkpoint(os.path.join(out, 'last.pt'))
            self.assertGreaterEqual(ckpt['iter_num'], 3)
        log = output_of(gpt.main, self.train_args(out=sig.name, max_iters=ckpt['iter_num'] + 2) + ['--init_from=resume'])
        self.assertIn(f"resuming at iter {ckpt['iter_num']}", log)

    def test_bad_inputs_fail_with_one_clear_line_and_change_no_file(self):
        d = self.dir
        quiet(gpt.main, self.train_args(out='run', max_iters=2, lr_decay_iters=2))
        os.makedirs(f'{d}/broken')
        with open(f'{d}/run/last.pt', 'rb') as f:
            truncated = f.read()[:3000]
        for name, data in (('last.pt', truncated), ('ckpt.pt', truncated)):
            with open(f'{d}/broken/{name}', 'wb') as f:
                f.write(data)
        os.makedirs(f'{d}/empty_out')
        texts = {'empty.txt': b'', 'short.txt': b'too short', 'latin1.txt': 'caf\u00e9 '.encode('latin-1') * 50,
                 'huge_vocab.txt': ''.join(chr(c) for c in range(0x4E00, 0x4E00 + 70000) if not 0xD800 <= c < 0xE000).encode(),
                 'other.txt': b'abcdefghij' * 50}
        for name, data in texts.items():
            with open(f'{d}/{name}', 'wb') as f:
                f.write(data)
        quiet(prepare.prepare, f'{d}/other.txt', f'{d}/other_data')
        quiet(prepare.prepare, self.input, f'{d}/no_meta')
        os.remove(f'{d}/no_meta/meta.json')
        train = self.train_args(out='new')
        cases = [  # (script, arguments, words the one-line error must contain)
            ('gpt.py', train + ['--n_embd=30', '--n_head=4'], 'multiple of --n_head'),
            ('gpt.py', train + ['--n_layer=0'], '--n_layer must be positive'),
            ('gpt.py', train + ['--batch_size=-1'], '--batch_size must be positive'),
            ('gpt.py', train + ['--max_iters=0'], '--max_iters must be positive'),
            ('gpt.py', train + ['--learning_rate=0'], '--learning_rate must be positive'),
            ('gpt.py', train + ['--dropout=1'], '--dropout must be in [0, 1)'),
            ('gpt.py', train + ['--eval_iters=0'], '--eval_iters must be positive'),
            ('gpt.py', train + ['--block_size=5000'], '--block_size=5000 needs more than'),
            *[('gpt.py', train + [f'--device={dev}'], 'not available') for dev, here in
              (('cuda', torch.cuda.is_available()), ('mps', torch.backends.mps.is_available())) if not here],
            ('gpt.py', train + ['--dtype=float16'], '--dtype=float16 needs a CUDA GPU'),
            ('gpt.py', train + [f'--out_dir={self.input}/sub'], 'cannot be created'),
            ('gpt.py', train + [f'--data_dir={d}/missing'], 'holds no train.bin'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/empty_out'], 'there is no'),
            ('gpt.py', train + [f'--out_dir={d}/run'], 'already holds a checkpoint'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/run', '--n_layer=3'], 'keeps its model'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/run', f'--data_dir={d}/other_data'], 'vocabulary'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/broken'], 'not a readable checkpoint'),
            ('gpt.py', train + ['--n_layers=3'], 'did you mean --n_layer'),
            ('gpt.py', train + ['--n_layer=two'], "invalid int value: 'two'"),
            ('gpt.py', train + ['--compile=maybe'], "--compile: invalid boolean value: 'maybe'"),
            ('gpt.py', train + ['--init_from=continue'], 'invalid choice'),
            ('prepare.py', [f'--input={d}/nope.txt', f'--data_dir={d}/x'], 'does not exist'),
            ('prepare.py', [f'--input={d}/empty.txt', f'--data_dir={d}/x'], 'has 0 characters'),
            ('prepare.py', [f'--input={d}/short.txt', f'--data_dir={d}/x'], 'needs at least'),
            ('prepare.py', [f'--input={d}/latin1.txt', f'--data_dir={d}/x'], 'not UTF-8'),
            ('prepare.py', [f'--input={d}/huge_vocab.txt', f'--data_dir={d}/x'], 'at most 65535'),
            ('sample.py', [f'--out_dir={d}/empty_out'], 'train a model first'),
            ('sample.py', [f'--out_dir={d}/broken'], 'not a readable checkpoint'),
            ('sample.py', [f'--out_dir={d}/run', '--start=Z'], "'Z'"),
            ('sample.py', [f'--out_dir={d}/run', '--start='], '--start is empty'),
            ('sample.py', [f'--out_dir={d}/run', f'--start=FILE:{d}/nope.txt'], 'cannot be read'),
            ('sample.py', [f'--out_dir={d}/run', '--temperature=-1'], '--temperature=-1.0 must be'),
            ('sample.py', [f'--out_dir={d}/run', '--top_k=0'], '--top_k=0 must be'),
            ('sample.py', [f'--out_dir={d}/run', '--top_p=0'], '--top_p=0.0 must be in (0, 1]'),
            ('sample.py', [f'--out_dir={d}/run', '--top_p=1.5'], '--top_p=1.5 must be in (0, 1]'),
            ('sample.py', [f'--out_dir={d}/run', '--repetition_penalty=0'], '--repetition_penalty=0.0 must be'),
            ('sample.py', [f'--out_dir={d}/run', '--beams=0'], '--beams=0 must be'),
            ('sample.py', [f'--out_dir={d}/run', '--max_new_tokens=-1'], '--max_new_tokens=-1 must be'),
            ('sample.py', [f'--out_dir={d}/run', '--num_samples=0'], '--num_samples=0 must be'),
            ('sample.py', [f'--out_dir={d}/run', '--beams=3', '--top_p=0.9'], 'drop --top_p'),
            ('sample.py', [f'--out_dir={d}/run', '--device=gpu'], "invalid choice: 'gpu'"),
            ('gpt.py', train + ['--learning_rate=nan'], '--learning_rate must be positive'),
            ('gpt.py', train + [f'--data_dir={d}/no_meta'], 'is incomplete'),
        ]
        before = snapshot(d)
        with tempfile.TemporaryDirectory() as logs:
            results = run_many([case[:2] for case in cases], logs)
        for (script, args, words), (code, stdout, stderr) in zip(cases, results):
            with self.subTest(script=script, args=args[-2:]):
                self.assertEqual(code, 2, stderr)
                self.assertNotIn('Traceback', stderr)
                lines = stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, stderr)
                self.assertTrue(lines[0].startswith('error: '), lines[0])
                self.assertIn(words, lines[0])
        self.assertEqual(snapshot(d), before)



def _one_ddp_step(rank, world_size, rendezvous, batches, out_path):
    """A process of a 2-process DDP group (gloo, CPU): one SGD step with lr 1 on this rank's batch."""
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world_size)
    model = tiny_model().train()  # the same seed: the same weights on every rank
    ddp = DDP(model)
    with mock.patch.multiple(gpt, get_batch=lambda split: batches[rank], grad_clip=0.0, dtype='float32',
                             gradient_accumulation_steps=1):
        gpt.train_step(ddp, torch.optim.SGD(model.parameters(), lr=1.0), torch.amp.GradScaler(enabled=False), 1.0)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    dist.destroy_process_group()


def sgd_step_on(batches, accumulation=1):
    """The weights of tiny_model after one SGD step (lr 1) on the given micro-batches."""
    model = tiny_model().train()
    it = iter(batches)
    with mock.patch.multiple(gpt, get_batch=lambda split: next(it), grad_clip=0.0, dtype='float32',
                             gradient_accumulation_steps=accumulation):
        gpt.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.amp.GradScaler(enabled=False), 1.0)
    return model.state_dict()


class TestScalingUp(DataDirTest):

    def batches(self, n):
        torch.manual_seed(1)
        return [(torch.randint(11, (2, 8)), torch.randint(11, (2, 8))) for _ in range(n)]

    def assert_same_weights(self, a, b):
        for key in a:
            self.assertTrue(torch.allclose(a[key], b[key], atol=1e-6), key)

    def test_accumulating_two_micro_batches_equals_one_step_on_both(self):
        b = self.batches(2)
        combined = (torch.cat([b[0][0], b[1][0]]), torch.cat([b[0][1], b[1][1]]))
        self.assert_same_weights(sgd_step_on(b, accumulation=2), sgd_step_on([combined]))

    def test_a_ddp_step_on_two_processes_equals_one_step_on_both_batches(self):
        b = self.batches(2)
        out_path = os.path.join(self.dir, 'ddp.pt')
        rendezvous = os.path.join(self.dir, 'rendezvous')  # a file the processes meet through: no port to clash
        torch.multiprocessing.spawn(_one_ddp_step, args=(2, rendezvous, b, out_path), nprocs=2)
        combined = (torch.cat([b[0][0], b[1][0]]), torch.cat([b[0][1], b[1][1]]))
        self.assert_same_weights(torch.load(out_path, weights_only=True), sgd_step_on([combined]))

    def test_torchrun_with_two_cpu_processes_trains_and_saves_a_checkpoint_sample_py_reads(self):
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                            os.path.join(HERE, 'gpt.py'), *self.train_args(max_iters=4, lr_decay_iters=4,
                                                                         gradient_accumulation_steps=2)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn('x gradient_accumulation_steps 2 x 2 processes', r.stdout)
        self.assertEqual(r.stdout.count('done: best val loss'), 1)  # only process 0 reports
        r = run('sample.py', f'--out_dir={self.dir}/out', '--start=Sing', '--num_samples=1', '--max_new_tokens=5')
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith('Sing'))


class TestWatchingTraining(DataDirTest):

    def test_a_run_leaves_a_loss_curve_with_one_point_per_eval_for_each_series(self):
        quiet(gpt.main, self.train_args())
        svg = ElementTree.parse(os.path.join(self.dir, 'out', 'loss.svg'))  # well-formed XML
        lines = svg.getroot().findall('{http://www.w3.org/2000/svg}polyline')
        self.assertEqual(len(lines), 2)  # train and val
        for line in lines:
            self.assertEqual(len(line.get('points').split()), 3)  # evals at iterations 0, 6 and 12
        with open(os.path.join(self.dir, 'out', 'samples.txt'), encoding='utf-8') as f:
            self.assertEqual(re.findall(r'^--- iter (\d+)$', f.read(), re.M), ['0', '6', '12'])

    def test_log_csv_keeps_its_rows_across_a_resume_without_duplicates(self):
        quiet(gpt.main, self.train_args(max_iters=6))
        with open(os.path.join(self.dir, 'out', 'log.csv'), encoding='utf-8') as f:
            before = f.read()
        for name, lost in (('log.csv', '9,99.0,2.0,,,0.001,1000\n'), ('samples.txt', '--- iter 9\nlost text\n')):
            with open(os.path.join(self.dir, 'out', name), 'a', encoding='utf-8') as f:
                f.write(lost)  # written by a run killed after last.pt: its training is lost on resume
        quiet(gpt.main, self.train_args() + ['--init_from=resume'])
        with open(os.path.join(self.dir, 'out', 'log.csv'), encoding='utf-8') as f:
            after = f.read()
        self.assertTrue(after.startswith(before))
        rows = list(csv.DictReader(io.StringIO(after)))
        steps = [int(r['iter']) for r in rows if r['val_loss'] == '']
        evals = [int(r['iter']) for r in rows if r['val_loss'] != '']
        self.assertEqual((steps, evals), (list(range(1, 13)), [0, 6, 12]))
        self.assertEqual([float(r['elapsed_s']) for r in rows], sorted(float(r['elapsed_s']) for r in rows))
        with open(os.path.join(self.dir, 'out', 'samples.txt'), encoding='utf-8') as f:
            self.assertEqual(re.findall(r'^--- iter (\d+)$', f.read(), re.M), ['0', '6', '12'])

    def test_the_progress_line_is_printed_only_to_a_terminal(self):
        class Terminal(io.StringIO):
            def isatty(self):
                return True
        for stream, expected in ((io.StringIO(), False), (Terminal(), True)):
            with contextlib.redirect_stdout(stream):
                gpt.main(self.train_args(out=str(expected), log_interval=5))
            self.assertEqual('\r' in stream.getvalue(), expected)


if __name__ == '__main__':
    unittest.main()
