"""
Tests: each states a property of a GPT or of its scripts. CPU, tiny models, no network, no input.txt.

    python -m unittest test_gpt
"""
import argparse
import concurrent.futures
import contextlib
import csv
import errno
import gc
import io
import json
import math
import multiprocessing
import os
import pathlib
import random
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock
from xml.etree import ElementTree

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bench
import gpt
import prepare
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)  # tiny models: one thread is faster, and steady on a busy machine
os.environ.setdefault('OMP_NUM_THREADS', '1')  # and so in the processes the tests start
TEXT = ''.join(f"{w} the {n} of {v}.\n" for w, n, v in zip(
    ['Sing', 'Tell', 'Speak', 'Weep', 'Laugh', 'Dream', 'Fight'] * 20,
    ['song', 'tale', 'truth', 'grief', 'joy', 'night', 'war', 'sea'] * 20,
    ['kings', 'queens', 'fools', 'gods', 'men', 'stars', 'ships', 'wolves', 'fields'] * 20))


def tiny_model(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, seed=0, flash=True):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, flash)).eval()


def output_of(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    return out.getvalue()


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def cli(script, args):
    """Run a script's command line in this process, as `python script args` would: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    main = {'gpt.py': gpt.main, 'prepare.py': prepare.main, 'sample.py': sample.main}[script]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            gpt.run_cli(main, args, **({'lower': sample.LOWER} if script == 'sample.py' else {}))
        except SystemExit as e:
            code = e.code or 0 if not isinstance(e.code, str) else print(e.code, file=sys.stderr) or 1
    return code, out.getvalue(), err.getvalue()


def cli_bench(args):  # bench.py's command line in this process: (exit code, stdout, stderr)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        gpt.run_cli(bench.main, args)
        return 0, out.getvalue(), err.getvalue()
    return 2, out.getvalue(), err.getvalue()


def run(script, *args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, **kwargs)


def snapshot(folder):
    """Every file under folder with its bytes, to prove that nothing was changed."""
    return {p: p.read_bytes() for p in pathlib.Path(folder).rglob('*') if p.is_file()}


class DataDirTest(unittest.TestCase):
    """A temporary folder holding a small corpus and the token files prepare.py made from it."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.input = os.path.join(self.dir, 'input.txt')
        pathlib.Path(self.input).write_text(TEXT, encoding='utf-8')
        self.data_dir = os.path.join(self.dir, 'data')
        self.meta = quiet(prepare.prepare, self.input, self.data_dir)

    def train_args(self, out='out', **overrides):
        return training_args(self.dir, out, **overrides)


def training_args(folder, out='out', **overrides):
    """gpt.py's arguments for a quick run of a small model on folder/data, into folder/out."""
    args = dict(data_dir=os.path.join(folder, 'data'), out_dir=os.path.join(folder, out), batch_size=4, block_size=16,
                n_layer=2, n_head=2, n_embd=32, max_iters=12, lr_decay_iters=12, warmup_iters=2,
                eval_interval=6, eval_iters=2, log_interval=1, device='cpu')
    args.update(overrides)
    return [f'--{k}={v}' for k, v in args.items()]


# -- Launches started ahead ------------------------------------------------------------------------------------------
# A few tests start processes and wait for them: torchrun, a fresh folder's first `python gpt.py`. A new process
# spends about 2 s of a core importing torch (and its compiler, at the first optimizer), while the other tests run
# in this process, on one thread. So when the whole module runs (python -m unittest test_gpt), these launches start
# with the suite, one after another in a background thread, each in a folder of its own; they use the second core
# while the other tests run, and the test takes what its launch returned and asserts on it as if it had just
# launched it. A test run alone (python -m unittest test_gpt.TestX.test_y) launches when it runs, in its folder.
# A launch in the background only runs processes and touches its folder: no print, no mock, no torch, no tempfile,
# no chdir, as the test running beside it may be redirecting stdout or mocking those; its processes get the
# environment the suite started with, as that test may patch os.environ. The launches that fork this process (it
# shares its imports with the copies: no 2 s each) run before the thread starts, as a fork copies only the thread
# that calls it.

ENVIRONMENT = dict(os.environ)
LANES = 1  # launches running at once beside the tests (a torchrun launch is three processes)
AHEAD = {}  # (launch, args) -> a function that waits for what launch(folder, *args) returned


def load_tests(loader, tests, pattern):  # the loader found the whole module
    return SuiteWithLaunchesAhead(tests)


class SuiteWithLaunchesAhead(unittest.TestSuite):
    """The module's tests, run once the launches of those that have one have started."""

    def run(self, result, debug=False):
        def ids(suite):
            for test in suite:
                yield from ids(test) if isinstance(test, unittest.TestSuite) else [test.id().split('.', 1)[1]]
        selected = set(ids(self))

        def of_selected(launches):  # {test: [(launch, *args), ...]} -> [(launch, args), ...] of the tests here
            return [(launch, tuple(args)) for test, started in launches.items() if test in selected
                    for launch, *args in started]
        forking = of_selected({  # run now, one after the other, before the background thread starts
            'TestTorchrunAgreement.test_a_nan_on_one_process_or_a_full_disk_on_another_ends_every_process_with_'
            'one_line': [(two_processes_with_a_fault, 'nan_on_rank_1'), (two_processes_with_a_fault,
                                                                         'full_disk_on_rank_0')],
            'TestScalingUp.test_a_ddp_step_on_two_processes_equals_one_step_on_both_batches':
                [(ddp_step_on_two_processes,)],
            'TestReliability.test_a_kill_during_the_first_checkpoint_write_leaves_a_folder_a_new_run_starts_in':
                [(killed_during_the_first_checkpoint_write,)]})
        in_background = of_selected({  # started in this order
            'TestBench.test_ctrl_c_during_bench_target_stops_gpt_py_and_deletes_its_folder': [(ctrl_c_during_bench_target,)],
            'TestCheckpointAndConfig.test_end_to_end_a_fresh_folder_prepares_its_data_trains_and_samples':
                [(gpt_py_in_a_fresh_folder,)],
            'TestScalingUp.test_torchrun_with_two_cpu_processes_trains_and_saves_a_checkpoint_'
            'sample_py_reads': [(torchrun_trains_on_two_cpu_processes,)]})
        with contextlib.ExitStack() as stack:  # on the way out: no launch left waiting, then no folder left
            folders = {key: stack.enter_context(data_folder()) for key in forking + in_background}
            pool = concurrent.futures.ThreadPoolExecutor(LANES, thread_name_prefix='launch')
            stack.callback(pool.shutdown, cancel_futures=True)
            stack.callback(AHEAD.clear)
            for launch, args in forking:
                AHEAD[launch, args] = run_now(launch, folders[launch, args], *args).result
            for launch, args in in_background:
                AHEAD[launch, args] = pool.submit(launch, folders[launch, args], *args).result
            return super().run(result, debug)


def run_now(launch, *args):
    """A finished Future of launch(*args): its result, or what it raised, for the test to see."""
    future = concurrent.futures.Future()
    try:
        future.set_result(launch(*args))
    except Exception as e:
        future.set_exception(e)
    return future


def launched(folder, launch, *args):
    """What launch(folder, *args) returns: started ahead, in a folder of its own, when the whole module runs;
    otherwise run now, in `folder`."""
    wait = AHEAD.pop((launch, args), None)
    return wait() if wait else launch(folder, *args)


@contextlib.contextmanager
def data_folder():
    """A temporary folder as DataDirTest.setUp makes one: input.txt and the token files prepare.py made of it."""
    with tempfile.TemporaryDirectory() as folder:
        pathlib.Path(folder, 'input.txt').write_text(TEXT, encoding='utf-8')
        quiet(prepare.prepare, os.path.join(folder, 'input.txt'), os.path.join(folder, 'data'))
        yield folder


_run_process = subprocess.run  # the real one, whatever a test beside a launch mocks


def completed(args, cwd, **environment):
    """subprocess.run(args) in cwd, capturing its output, in the environment the suite started with."""
    return _run_process(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                        env={**ENVIRONMENT, **environment})


class TestTokenizerAndData(DataDirTest):

    def test_tokenizer_round_trip(self):
        tok = gpt.load_tokenizer(self.meta['tokenizer'])
        self.assertEqual(tok.decode(tok.encode(TEXT)), TEXT)
        self.assertEqual(tok.vocab_size, len(set(TEXT)))

    def test_a_prompt_with_characters_outside_the_vocabulary_is_a_clear_error(self):
        model, tok = tiny_model(vocab_size=self.meta['vocab_size']), gpt.load_tokenizer(self.meta['tokenizer'])
        with mock.patch.object(sample, 'load_model', lambda path, device: (model, tok)):
            code, _, err = cli('sample.py', ['--start=Sing Zé', '--device=cpu'])
        self.assertEqual((code, err), (2, "error: characters not in the model's vocabulary: 'Zé'; remove them\n"))

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
                self.assertRaisesRegex(gpt.UserError, r'download failed .* save https://\S+ as input.txt by hand, '
                                       r'or prepare a text of your own: python prepare.py --input='):
            quiet(prepare.main, [])
        self.assertFalse(os.path.exists('input.txt'))

    def test_prepare_reads_in_chunks_with_the_same_result(self):
        with mock.patch.object(prepare, 'CHUNK', 7):
            quiet(prepare.prepare, self.input, os.path.join(self.dir, 'chunked'))
        for split in ('train.bin', 'val.bin'):
            self.assertEqual(pathlib.Path(self.data_dir, split).read_bytes(),
                             pathlib.Path(self.dir, 'chunked', split).read_bytes())

    def test_get_batch_targets_are_inputs_shifted_by_one(self):
        with mock.patch.multiple(gpt, data_dir=self.data_dir, batch_size=5, block_size=12, device='cpu'):
            x, y = gpt.get_batch('train')
        self.assertEqual((x.shape, y.shape), ((5, 12), (5, 12)))
        self.assertTrue(torch.equal(x[:, 1:], y[:, :-1]))
        tok = gpt.load_tokenizer(self.meta['tokenizer'])
        text = tok.decode(np.fromfile(os.path.join(self.data_dir, 'train.bin'), dtype=np.uint16).tolist())
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            self.assertIn(tok.decode(row_x + row_y[-1:]), text)  # a real window of the train split

    def test_eval_covers_fixed_windows_and_equals_a_plain_loop(self):
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16)
        with mock.patch.multiple(gpt, data_dir=self.data_dir, batch_size=3, block_size=16, eval_iters=100,
                                 device='cpu', dtype='float32'):
            losses = gpt.estimate_loss(model, self.meta)
            n = (self.meta['val_tokens'] - 1) // 16  # every window of the val split, none twice
            plain = [model(*gpt.get_batch('val', [i * 16]))[1].item() for i in range(n)]
        self.assertAlmostEqual(losses['val'], sum(plain) / len(plain), places=5)


class TestBPE(DataDirTest):

    def bpe(self, vocab_size=300):
        meta = quiet(prepare.prepare, self.input, os.path.join(self.dir, 'bpe'), 'bpe', vocab_size)
        return meta, gpt.load_tokenizer(meta['tokenizer'])

    def test_bpe_round_trips_any_unicode_text(self):
        _, tok = self.bpe()
        for text in (TEXT[:300], 'Ünïcödé — 漢字, emoji 🙂, tabs\tand\r\nnewlines', ''.join(map(chr, range(32, 900)))):
            self.assertEqual(tok.decode(tok.encode(text)), text)

    def test_bpe_merges_shorten_the_text_and_overlapping_pairs_merge_left_to_right(self):
        meta, tok = self.bpe()
        self.assertEqual(meta['vocab_size'], 300)
        self.assertLess(len(tok.encode(TEXT)), 0.6 * len(TEXT.encode('utf-8')))
        one_merge = gpt.BPETokenizer([(7, 7)])  # bytes 7, 7 -> id 256
        self.assertEqual(one_merge.encode('\x07\x07\x07\x01\x07\x07'), [256, 7, 1, 256])
        self.assertEqual(one_merge.encode('\x07\x07\x07\x07\x07\x02\x07'), [256, 256, 7, 2, 7])

    def test_bpe_encode_of_the_train_text_equals_the_tokens_prepare_wrote(self):
        meta, tok = self.bpe()
        train = np.fromfile(os.path.join(self.dir, 'bpe', 'train.bin'), dtype=np.uint16).tolist()
        val = np.fromfile(os.path.join(self.dir, 'bpe', 'val.bin'), dtype=np.uint16).tolist()
        self.assertEqual(train, tok.encode(TEXT[:meta['train_chars']]))
        self.assertEqual(val, tok.encode(TEXT[meta['train_chars']:]))

    def test_bpe_decodes_any_ids_replacing_broken_utf8(self):
        meta = quiet(prepare.prepare, self.input, os.path.join(self.dir, 'bpe'), 'bpe', 300)
        tok = gpt.load_tokenizer(meta['tokenizer'])
        merges = meta['tokenizer']['merges']

        def spelled(i):  # the bytes of an id, by undoing its merges
            return bytes([i]) if i < 256 else spelled(merges[i - 256][0]) + spelled(merges[i - 256][1])
        ids = torch.randint(tok.vocab_size, (500,), generator=torch.Generator().manual_seed(0)).tolist()
        ids += [195, 169, 256, 195]  # 'é' whole, then half of it
        expected = b''.join(map(spelled, ids)).decode('utf-8', errors='replace')
        self.assertEqual(tok.decode(ids), expected)
        self.assertTrue(tok.decode(ids).endswith('é' + tok.decode([256]) + '\ufffd'))
        self.assertEqual(tok.decode(list('é'.encode('utf-8'))[:1]), '\ufffd')  # half a character
        text = TEXT[:300] + ' Ünïcödé 🙂'
        self.assertEqual(tok.decode(tok.encode(text)), text)

    def test_a_bpe_model_trains_resumes_reports_bits_per_char_and_samples_from_any_start_text(self):
        meta = quiet(prepare.prepare, self.input, os.path.join(self.dir, 'bpe'), 'bpe', 300)
        data = os.path.join(self.dir, 'bpe')
        quiet(gpt.main, self.train_args(data_dir=data, max_iters=6))
        log = output_of(gpt.main, self.train_args(data_dir=data) + ['--init_from=resume'])
        self.assertRegex(log, r'\d\.\d+ bits/char')
        for row in csv_rows(os.path.join(self.dir, 'out', 'log.csv')):  # nats per token -> bits per character
            if row['val_loss']:
                bpc = float(row['val_loss']) * meta['val_tokens'] / meta['val_chars'] / math.log(2)
                self.assertAlmostEqual(float(row['val_bpc']), bpc, delta=1e-3)
        self.assertEqual(torch.load(os.path.join(self.dir, 'out', 'last.pt'), weights_only=True)['iter_num'], 12)
        out_dir, start = os.path.join(self.dir, 'out'), 'Zebras über 🙂'
        out = output_of(sample.main, [f"--out_dir={out_dir}", f'--start={start}', '--num_samples=2',
                                      '--max_new_tokens=10', '--device=cpu'])
        self.assertEqual(out, ''.join(f"{'-' * 20} sample {i + 1}\n{text}\n"
                                      for i, text in enumerate(expected_samples(out_dir, start, 2, 10))))
        out = output_of(sample.main, [f"--out_dir={out_dir}", f'--start={start}', '--num_samples=1',
                                      '--max_new_tokens=10', '--device=cpu'])
        self.assertEqual(out, expected_samples(out_dir, start, 1, 10)[0] + '\n')  # streamed: the same text
        for stream in ('1', '3'):  # the stop text ends each sample, wherever BPE cut it into tokens
            out = output_of(sample.main, [f"--out_dir={out_dir}", '--start=Zebras', '--stop=e',
                                          '--num_samples=' + stream, '--max_new_tokens=80', '--temperature=2'])
            for text in out.split('-' * 20 + ' sample ')[1:] if stream == '3' else [out]:
                generated = text.split('Zebras', 1)[1].rstrip('\n')
                self.assertEqual(generated.count('e'), 1, generated)
                self.assertTrue(generated.endswith('e'), generated)


class TestModel(unittest.TestCase):

    def test_loss_at_init_is_about_ln_vocab_size(self):
        model = tiny_model(vocab_size=65, block_size=32)
        _, loss = model(torch.randint(65, (8, 32)), torch.randint(65, (8, 32)))
        self.assertAlmostEqual(loss.item(), math.log(65), delta=0.1)

    def test_logits_do_not_depend_on_future_tokens(self):
        for flash in (True, False):
            model = tiny_model(flash=flash)
            idx = torch.randint(11, (2, 8))
            changed = idx.clone()
            changed[:, 5:] = (changed[:, 5:] + 1) % 11
            a, b = model(idx)[0], model(changed)[0]
            self.assertTrue(torch.allclose(a[:, :5], b[:, :5], atol=1e-6))
            self.assertFalse(torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3))

    def test_fused_attention_equals_the_written_out_head_math(self):
        flash, explicit = tiny_model(flash=True), tiny_model(flash=False)  # the same seed: the same weights
        idx = torch.randint(11, (3, 8))
        self.assertTrue(torch.allclose(flash(idx)[0], explicit(idx)[0], atol=1e-5))
        q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)  # (B, nh, T, hs) each
        self.assertTrue(torch.allclose(gpt.Head(0.0, flash=False)(q, k, v),
                                       torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                       atol=1e-6))

    def test_a_model_with_no_blocks_is_a_bigram_model(self):
        model = tiny_model(n_layer=0)
        idx = torch.randint(11, (2, 8))
        changed = idx.clone()
        changed[:, :4] = (changed[:, :4] + 1) % 11  # earlier tokens do not matter, only the token and its position
        self.assertTrue(torch.equal(model(idx)[0][:, 4:], model(changed)[0][:, 4:]))

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
        for _ in range(150):
            ix = torch.randint(len(data) - 32, (16,))
            _, loss = model(torch.stack([data[i:i + 32] for i in ix]), torch.stack([data[i + 1:i + 33] for i in ix]))
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

    def test_generate_extends_by_max_new_tokens_and_top_k_1_is_the_argmax(self):
        model = tiny_model()
        idx = torch.zeros((2, 1), dtype=torch.long)
        out = model.generate(idx, 20, top_k=1)  # past block_size: the last 8 tokens are the context
        self.assertEqual(out.shape, (2, 21))
        for t in range(1, 21):
            self.assertTrue(torch.equal(out[:, t], model(out[:, max(0, t - 8):t])[0][:, -1].argmax(-1)))

    def test_the_logits_are_lm_head_of_ln_f_of_the_last_blocks_output(self):
        model = tiny_model()
        with torch.no_grad():
            model.ln_f.weight.uniform_(0.5, 2.0)
            model.ln_f.bias.normal_(0, 0.5)
        idx = torch.randint(11, (2, 8))
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(8))
        for block in model.blocks:
            x = block(x)
        logits = model(idx)[0]
        self.assertTrue(torch.allclose(logits, model.lm_head(model.ln_f(x)), atol=1e-6))
        self.assertFalse(torch.allclose(logits, model.lm_head(x), atol=1e-2))  # ln_f is no identity here

    def test_the_forward_pass_equals_a_transformer_written_out_from_its_weights(self):
        idx = torch.randint(11, (3, 8))
        for flash in (True, False):
            model = nudged(tiny_model(flash=flash))
            with self.subTest(flash=flash), torch.no_grad():
                self.assertLess((model(idx)[0] - written_out_forward(model, idx)).abs().max().item(), 1e-5)
        model = nudged(tiny_model(n_embd=24, n_head=3, block_size=12))  # hs 8, T 10: a scale by T or C shows
        idx = torch.randint(11, (2, 10))
        with torch.no_grad():
            self.assertLess((model(idx)[0] - written_out_forward(model, idx)).abs().max().item(), 1e-5)


class PieceTokenizer:
    """Tokens of one or more characters, like BPE's, so that a stop text can fall across tokens, and two that
    are halves of the UTF-8 bytes of 'é'. It records how many tokens each decode call gets."""
    pieces = [b'a', b'b', b'c', b'd', b' ', b'\n', b'ab', b'ba', b'cd', b'dc', b'abc', b'\xc3', b'\xa9']

    def __init__(self):
        self.vocab_size, self.decoded = len(self.pieces), []

    def encode(self, text):
        return [self.pieces.index(ch.encode()) for ch in text]

    def decode(self, ids):
        self.decoded.append(len(ids))
        return b''.join(self.pieces[i] for i in ids).decode('utf-8', errors='replace')


def run_main(model, tokenizer, *args):
    """sample.py's output for these arguments, with `model` and `tokenizer` as the checkpoint."""
    out = io.StringIO()
    with mock.patch.object(sample, 'load_model', lambda path, device: (model, tokenizer)), \
            contextlib.redirect_stdout(out):
        sample.main(['--device=cpu', *args])
    return out.getvalue()


class TestGeneration(unittest.TestCase):

    def test_kv_cache_matches_full_recompute(self):
        model = tiny_model(block_size=16)
        idx = torch.randint(11, (3, 4))
        cache = sample.KVCache(model.config)
        for _ in range(40):  # inside the window, then past it: the window moves at 17, 25, 33 and 41 tokens
            cached, full = sample.next_logits(model, idx, cache), sample.next_logits(model, idx)
            self.assertTrue(torch.allclose(cached, full, atol=1e-5))
            if idx.shape[1] <= 16:
                self.assertTrue(torch.allclose(cached, model(idx)[0][:, -1], atol=1e-5))
            self.assertEqual(cache.length, idx.shape[1] - sample.window_start(idx.shape[1], 16))
            idx = torch.cat((idx, cached.argmax(-1, keepdim=True)), dim=1)

    def test_cached_and_recomputed_generation_give_the_same_text_past_block_size(self):
        model = tiny_model(block_size=8)
        idx = torch.randint(11, (2, 3))
        for temperature in (1.0, 0.0):  # sampling with the same seed, and greedy
            texts = [sample.sample(model, idx, 40, temperature, generator=torch.Generator().manual_seed(7),
                                   use_cache=use_cache) for use_cache in (True, False)]
            self.assertEqual(texts[0].shape, (2, 43))
            self.assertTrue(torch.equal(texts[0], texts[1]))

    def test_generation_past_block_size_sees_a_window_of_the_latest_tokens(self):
        model = tiny_model(block_size=8)
        idx = torch.randint(11, (1, 3))
        out = sample.sample(model, idx, 30, temperature=0)
        for t in range(3, out.shape[1]):  # every token is the argmax over its own context window
            start = sample.window_start(t, 8)
            self.assertTrue(min(t, 5) <= t - start <= 8)
            self.assertEqual(out[0, t].item(), model(out[:, start:t])[0][0, -1].argmax().item())

    def test_a_bigram_model_generates_with_the_cache(self):
        model = tiny_model(n_layer=0)  # no blocks, so nothing to cache, but positions still advance
        idx = torch.zeros((2, 1), dtype=torch.long)
        for temperature in (1.0, 0.0):
            texts = [sample.sample(model, idx, 20, temperature, generator=torch.Generator().manual_seed(3),
                                   use_cache=use_cache) for use_cache in (True, False)]
            self.assertTrue(torch.equal(texts[0], texts[1]))

    def test_same_seed_same_sample_other_seed_other_sample(self):
        model = tiny_model()
        idx = torch.zeros((2, 1), dtype=torch.long)
        a, b, c = (sample.sample(model, idx, 30, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
        self.assertTrue(torch.equal(a, b))
        self.assertFalse(torch.equal(a, c))

    def test_temperature_zero_is_greedy_and_deterministic(self):
        model = tiny_model()
        idx = torch.zeros((1, 1), dtype=torch.long)
        a = sample.sample(model, idx, 25, temperature=0)
        b = sample.sample(model, idx, 25, temperature=0, generator=torch.Generator().manual_seed(99))
        self.assertTrue(torch.equal(a, b))
        for t in range(1, 9):  # inside the window
            self.assertEqual(a[0, t].item(), model(a[:, :t])[0][0, -1].argmax().item())

    def test_top_k_1_sampling_is_greedy(self):
        model = tiny_model()
        idx = torch.zeros((1, 1), dtype=torch.long)
        runs = [sample.sample(model, idx, 20, top_k=1, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        self.assertTrue(torch.equal(runs[0], runs[1]))
        self.assertTrue(torch.equal(runs[0], sample.sample(model, idx, 20, temperature=0)))

    def test_top_k_keeps_only_the_k_likeliest_tokens_with_renormalized_probabilities(self):
        logits = torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0]])
        probs = torch.softmax(sample.filter_logits(logits, logits.long()[:, :0], 1.0, 2, 1.0, 1.0), -1)
        self.assertTrue(torch.allclose(probs[0, [1, 3]], torch.softmax(torch.tensor([4.0, 3.0]), -1)))
        self.assertEqual(probs[0, [0, 2, 4]].sum().item(), 0.0)
        self.assertTrue(torch.equal(sample.filter_logits(logits, logits.long()[:, :0], 1.0, 100, 1.0, 1.0), logits))

    def test_top_p_keeps_the_smallest_set_reaching_p(self):
        probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
        empty = probs.long()[:, :0]
        kept = torch.softmax(sample.filter_logits(probs.log(), empty, 1.0, 100, 0.8, 1.0), -1)
        self.assertTrue(torch.allclose(kept, torch.tensor([[0.5 / 0.8, 0.0, 0.3 / 0.8, 0.0]])))  # 0.5 + 0.3 reach 0.8
        kept = torch.softmax(sample.filter_logits(probs.log(), empty, 1.0, 100, 0.81, 1.0), -1)
        self.assertEqual((kept > 0).sum().item(), 3)
        kept = torch.softmax(sample.filter_logits(probs.log(), empty, 1.0, 3, 0.6, 1.0), -1)  # of the top 3 (sum 0.95):
        self.assertTrue(torch.allclose(kept, torch.tensor([[0.5 / 0.8, 0.0, 0.3 / 0.8, 0.0]])))  # 0.5 / 0.95 < 0.6

    def test_temperature_sharpens_or_flattens_the_distribution(self):
        logits = torch.tensor([[2.0, 1.0, 0.0]])
        empty = logits.long()[:, :0]
        for t in (0.5, 1.0, 2.0):
            probs = torch.softmax(sample.filter_logits(logits, empty, t, 100, 1.0, 1.0), -1)
            self.assertTrue(torch.allclose(probs, torch.softmax(logits / t, -1)))
        cold, hot = (torch.softmax(sample.filter_logits(logits, empty, t, 100, 1.0, 1.0), -1)[0, 0] for t in (0.5, 2.0))
        self.assertGreater(cold, hot)

    def test_repetition_penalty_makes_seen_tokens_less_likely(self):
        logits = torch.tensor([[2.0, -1.0, 2.0, -1.0]])
        out = sample.filter_logits(logits, torch.tensor([[0, 1, 1]]), 1.0, 100, 1.0, 2.0)
        self.assertTrue(torch.equal(out, torch.tensor([[1.0, -2.0, 2.0, -1.0]])))
        model = tiny_model()
        idx = torch.zeros((1, 1), dtype=torch.long)
        plain, penalized = (sample.sample(model, idx, 30, temperature=0, repetition_penalty=p) for p in (1.0, 5.0))
        self.assertLess(plain[0].unique().numel(), penalized[0].unique().numel())

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

    def test_a_finished_row_repeats_its_last_token_until_every_row_is_done(self):
        model = tiny_model()
        idx = torch.zeros((4, 1), dtype=torch.long)
        out = sample.sample(model, idx, 60, generator=torch.Generator().manual_seed(1),
                            stopped=lambda ids: ids[:, -1] == 3)
        ends = [row.tolist().index(3, 1) for row in out]  # each row's first 3 after the prompt
        self.assertGreater(len(set(ends)), 1)  # rows that end at different steps
        self.assertEqual(out.shape[1], max(ends) + 1)
        for row, end in zip(out, ends):
            self.assertTrue((row[end:] == 3).all())

    def test_stop_text_is_found_across_tokens_after_the_prompt_decoding_only_the_last_tokens(self):
        tok = PieceTokenizer()
        new = [tok.pieces.index(p) for p in (b'd', b'a', b'b', b'cd', b'abc', b'dc', b'd')]
        ids = torch.tensor([tok.encode('bc') + new])
        stopped = sample.stop_check(tok, 'bcd', prompt_len=2)  # 'bc' + 'd' does not count: 'bc' is the prompt
        found = [stopped(ids[:, :t]).item() for t in range(3, ids.shape[1] + 1)]
        self.assertEqual(found, [False, False, False, True, True, True, True])  # 'b' + 'cd'; 'abc' + 'dc' after
        self.assertLessEqual(max(tok.decoded), 3)
        self.assertEqual([sample.stop_check(tok, 'dcd', 2)(ids[:, :t]).item() for t in (7, 8, 9)], [False, False, True])

    def test_a_single_sample_streams_each_token_as_it_is_made(self):
        model = tiny_model()
        seen = []
        idx = torch.zeros((1, 1), dtype=torch.long)
        out = sample.sample(model, idx, 15, on_token=lambda idx: seen.append(idx.shape[1]))
        self.assertEqual(seen, list(range(2, 17)))
        self.assertEqual(out.shape, (1, 16))

    def test_streamed_text_is_the_sample_up_to_the_stop_text_and_no_step_decodes_the_whole_text(self):
        model, tok = tiny_model(vocab_size=13), PieceTokenizer()
        ids = sample.sample(model, torch.tensor([tok.encode('ab')]), 300, generator=torch.Generator().manual_seed(7))[0]
        text = tok.decode(ids.tolist())
        self.assertIn('é', text)  # streaming waited for its second byte
        ends = {len(tok.decode(ids[:t].tolist())) for t in range(3, len(ids) + 1)}  # where tokens end in the text
        stop = next(text[i:i + 3] for i in range(2, len(text) - 2) if text.find(text[i:i + 3], 2) == i
                    and i + 3 not in ends and ends & {i + 1, i + 2})  # a stop text across tokens, ending inside one
        for extra, expected in (([], text), ([f'--stop={stop}'], text[:text.find(stop, 2) + 3])):
            tok.decoded.clear()
            streamed = run_main(model, tok, '--start=ab', '--temperature=1', '--seed=7', '--max_new_tokens=300',
                                '--num_samples=1', *extra)
            self.assertEqual(streamed, expected + '\n')
            self.assertLess(sorted(tok.decoded)[-2], 10)  # a few tokens at a time; the whole text once, at the end

    def test_beam_search_with_one_beam_is_greedy(self):
        model = tiny_model()
        idx = torch.randint(11, (1, 3))
        greedy = sample.sample(model, idx, 20, temperature=0)  # past block_size: the cache is refilled on the way
        self.assertTrue(torch.equal(sample.beam_search(model, idx, 20, beams=1), greedy))

    def test_beam_search_reorders_the_cache_with_its_beams(self):
        model = tiny_model(seed=2)
        idx = torch.randint(11, (1, 3))
        texts = [sample.beam_search(model, idx, 25, beams=4, use_cache=use_cache) for use_cache in (True, False)]
        self.assertTrue(torch.equal(texts[0], texts[1]))

    def test_beam_search_finds_a_likelier_text_than_greedy(self):
        model = tiny_model(seed=3)
        idx = torch.randint(11, (1, 2))

        def logprob(seq):
            logits = model(seq[:, :-1])[0]
            return torch.log_softmax(logits, -1)[0, 1:].gather(1, seq[0, 2:, None]).sum().item()
        greedy, beam = sample.sample(model, idx, 6, temperature=0), sample.beam_search(model, idx, 6, beams=8)
        self.assertGreaterEqual(logprob(beam), logprob(greedy) - 1e-6)

    def test_length_penalty_decides_between_finished_beams_of_different_lengths(self):
        model = tiny_model(seed=4)
        idx = torch.zeros((1, 1), dtype=torch.long)
        stop_token = sample.sample(model, idx, 1, temperature=0)[0, 1].item()

        def ends(ids):  # a beam is finished once it produces the greedy first token again, after step 1
            return (ids[:, 2:] == stop_token).any(dim=1)
        lengths = {lp: sample.beam_search(model, idx, 12, beams=6, length_penalty=lp, stopped=ends).shape[1]
                   for lp in (0.0, 3.0)}
        self.assertLess(lengths[0.0], lengths[3.0])  # by log-probability the shortest wins; / length**3, a long one

    def test_sampling_draws_from_the_softmax_of_the_logits_divided_by_the_temperature_once(self):
        model = tiny_model()
        idx = torch.randint(11, (2, 5))
        logits = model(idx)[0][:, -1].detach()
        real_multinomial = torch.multinomial
        for temperature in (0.5, 2.0):
            for top_k in (200, 3):
                drawn_from = []

                def multinomial(probs, *args, **kwargs):
                    drawn_from.append(probs.clone())
                    return real_multinomial(probs, *args, **kwargs)
                with mock.patch.object(torch, 'multinomial', multinomial):
                    sample.sample(model, idx, 1, temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
                kept = logits >= logits.topk(top_k if top_k < 11 else 11).values[:, -1:]
                expected = torch.softmax((logits / temperature).masked_fill(~kept, float('-inf')), -1)
                with self.subTest(temperature=temperature, top_k=top_k):
                    self.assertEqual(len(drawn_from), 1)
                    self.assertTrue(torch.allclose(drawn_from[0], expected, atol=1e-6), (drawn_from[0], expected))

    def test_under_beam_search_every_cached_step_gives_the_logits_of_recompute(self):
        model = tiny_model(block_size=16)
        real_next_logits, gaps = sample.next_logits, []

        def checked(model, idx, cache=None):  # each step's logits, against a recompute of the same texts
            logits = real_next_logits(model, idx, cache)
            if cache is not None:
                gaps.append((logits - real_next_logits(model, idx)).abs().max().item())
            return logits
        with mock.patch.object(sample, 'next_logits', checked):
            sample.beam_search(model, torch.randint(11, (1, 3)), 12, beams=4)  # inside the window: no refill
        self.assertEqual(len(gaps), 12)
        self.assertLess(max(gaps), 1e-5)

    def test_the_written_out_attention_with_the_kv_cache_gives_the_logits_of_recompute(self):
        model = nudged(tiny_model(block_size=16, flash=False))
        idx = torch.randint(11, (3, 4))
        cache = sample.KVCache(model.config)
        for _ in range(30):  # one token at a time, past the window (refilled at 17 and 25 tokens)
            cached, full = sample.next_logits(model, idx, cache), sample.next_logits(model, idx)
            self.assertLess((cached - full).abs().max().item(), 1e-5)
            idx = torch.cat((idx, cached.argmax(-1, keepdim=True)), dim=1)
        prompt = idx[:, :16]
        whole = model(prompt)[0]
        with torch.inference_mode():  # a prompt in chunks through the cache: the logits of one forward
            cache = sample.KVCache(model.config)
            cache.clear(idx.device)
            parts = []
            for i in range(0, 16, 5):
                parts.append(model(prompt[:, i:i + 5], cache=cache)[0])
                cache.advance(parts[-1].shape[1])
        self.assertLess((torch.cat(parts, dim=1) - whole).abs().max().item(), 1e-5)


def gpt_py_in_a_fresh_folder(folder):
    """`python gpt.py` in a folder that holds input.txt and prompt.txt alone, then again once `data` is a file:
    (the first run, the second, the folder)."""
    fresh = os.path.join(folder, 'fresh')
    os.makedirs(fresh)
    pathlib.Path(fresh, 'input.txt').write_text(TEXT, encoding='utf-8')
    pathlib.Path(fresh, 'prompt.txt').write_text('Sing the', encoding='utf-8')
    gpt_py = [sys.executable, os.path.join(HERE, 'gpt.py')]
    r = completed([*gpt_py, '--max_iters=4', '--lr_decay_iters=4', '--warmup_iters=2', '--eval_interval=2', '--eval_iters=2',
                   '--batch_size=4', '--block_size=16', '--n_layer=1', '--log_interval=2'], cwd=fresh)
    if r.returncode:
        return r, None, fresh
    pathlib.Path(fresh, 'data').rename(pathlib.Path(fresh, 'data-kept'))  # now `data` cannot be a folder:
    pathlib.Path(fresh, 'data').write_text('a file')  # prepare.py, run by gpt.py, says so, and that is all
    r2 = completed([*gpt_py, '--max_iters=4', f'--out_dir={fresh}/out2'], cwd=fresh)
    pathlib.Path(fresh, 'data').unlink()
    pathlib.Path(fresh, 'data-kept').rename(pathlib.Path(fresh, 'data'))
    return r, r2, fresh


class TestCheckpointAndConfig(DataDirTest):

    def test_checkpoint_round_trip_gives_identical_logits_and_loads_weights_only(self):
        quiet(gpt.main, self.train_args(max_iters=3, lr_decay_iters=3))
        ckpt = torch.load(os.path.join(self.dir, 'out', 'ckpt.pt'), weights_only=True)
        self.assertEqual(ckpt['tokenizer'], self.meta['tokenizer'])
        model, tok = gpt.load_model(os.path.join(self.dir, 'out'))
        fresh = gpt.GPT(gpt.GPTConfig(**ckpt['model_args'])).eval()
        fresh.load_state_dict(ckpt['model'])
        idx = torch.tensor([tok.encode('Sing the song')])
        self.assertTrue(torch.equal(model(idx)[0], fresh(idx)[0]))
        self.assertFalse(any(k.startswith('_orig_mod') for k in ckpt['model']))

    def test_cli_overrides_parse_by_the_defaults_type(self):
        defaults = {'n_layer': 4, 'dropout': 0.1, 'compile': True, 'start': 'x'}
        self.assertEqual(gpt.parse_args(['--n_layer=6', '--dropout=0', '--compile=false', '--start=a=b'], defaults,
                                        gpt.__file__), {'n_layer': 6, 'dropout': 0.0, 'compile': False, 'start': 'a=b'})
        self.assertEqual(gpt.parse_args(['--compile=True', '--dropout=1e-1'], defaults, gpt.__file__),
                         {'compile': True, 'dropout': 0.1})

    def test_cli_rejects_unknown_keys_and_wrong_types_pointing_to_help(self):
        for args, words in ((['--n_layers=6'], r'^unknown setting --n_layers=6; python gpt.py --help lists them$'),
                            (['--n_layer=2.5'], 'expected int'),
                            (['--compile=maybe'], 'expected true or false'), (['n_layer=2'], 'unknown setting')):
            with self.assertRaisesRegex(gpt.UserError, words):
                gpt.parse_args(args, gpt.DEFAULTS, gpt.__file__)

    def test_help_lists_every_key_with_default_and_meaning(self):
        code, out, _ = cli('gpt.py', ['--help'])
        self.assertEqual(code, 0)
        for key in gpt.DEFAULTS:
            self.assertIn(f'--{key}=', out)
        self.assertIn('how many independent sequences', out)
        self.assertIn('--seed=1337', out)

    def test_importing_gpt_has_no_side_effects(self):
        empty = os.path.join(self.dir, 'empty')
        os.makedirs(empty)
        cwd = os.getcwd()
        os.chdir(empty)
        self.addCleanup(os.chdir, cwd)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for script in ('gpt.py', 'prepare.py', 'sample.py'):  # what `import` runs, as a module not __main__
                runpy.run_path(os.path.join(HERE, script), run_name='imported')
        self.assertEqual((out.getvalue(), err.getvalue(), os.listdir(empty)), ('', '', []))

    def test_end_to_end_a_fresh_folder_prepares_its_data_trains_and_samples(self):
        r, r2, fresh = launched(self.dir, gpt_py_in_a_fresh_folder)  # started ahead: see launched
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('running prepare.py first', r.stdout)
        # r2: once `data` cannot be a folder, prepare.py, run by gpt.py, says so, and that is all
        self.assertEqual((r2.returncode, r2.stderr.count('\n')), (2, 1), r2.stderr)
        self.assertRegex(r2.stderr, r'^error: cannot write to data/ \(')
        self.assertIn('val loss', r.stdout)
        self.assertTrue(os.path.isfile(os.path.join(fresh, 'data', 'train.bin')))
        code, stdout, err = cli('sample.py', [f'--out_dir={fresh}/out', f'--start=FILE:{fresh}/prompt.txt',
                                              '--num_samples=2', '--max_new_tokens=20'])
        self.assertEqual(code, 0, err)
        samples = stdout.split('-' * 20 + ' sample ')[1:]
        self.assertEqual(len(samples), 2)
        for s in samples:
            self.assertTrue(s.split('\n', 1)[1].startswith('Sing the'))

    def test_load_model_gives_a_model_in_eval_mode(self):
        trained = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.5).train()
        path = os.path.join(self.dir, 'ckpt.pt')
        torch.save({'model': trained.state_dict(), 'model_args': trained.config._asdict(),
                    'tokenizer': self.meta['tokenizer']}, path)
        model, _ = gpt.load_model(path)
        self.assertEqual([name for name, m in model.named_modules() if m.training], [])
        idx = torch.randint(self.meta['vocab_size'], (2, 16))
        self.assertTrue(torch.equal(model(idx)[0], model(idx)[0]))  # dropout 0.5 is off


def _kill_during_first_save(argv, log):  # a child process: SIGKILL in the middle of the first checkpoint write
    output = os.open(log, os.O_WRONLY | os.O_CREAT)
    for printed_to in (1, 2):  # stdout and stderr: to the log
        os.dup2(output, printed_to)
    with mock.patch.object(gpt.os, 'fsync', lambda fd: os.kill(os.getpid(), signal.SIGKILL)):
        gpt.main(argv)


def killed_during_the_first_checkpoint_write(folder):
    """gpt.py's main on folder/data, in a copy of this process (forked: it shares this one's imports) killed while
    it writes its first checkpoint: (its exit code, what it printed, the folder)."""
    from torch import _dynamo  # noqa: F401  what torch imports at an optimizer's first step: here, once
    log = os.path.join(folder, 'killed.log')
    child = multiprocessing.get_context('fork').Process(target=_kill_during_first_save,
                                                        args=(training_args(folder), log))
    child.start()
    child.join(120)
    if child.exitcode is None:  # alive: as subprocess.run's timeout would
        child.kill()
        raise subprocess.TimeoutExpired(['gpt.main', *training_args(folder)], 120, pathlib.Path(log).read_text())
    return child.exitcode, pathlib.Path(log).read_text(), folder


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

    def test_a_kill_during_the_first_checkpoint_write_leaves_a_folder_a_new_run_starts_in(self):
        returncode, printed, folder = launched(self.dir, killed_during_the_first_checkpoint_write)  # see launched
        out = os.path.join(folder, 'out')
        self.assertEqual(returncode, -signal.SIGKILL, printed)
        self.assertIn('ckpt.pt.tmp', os.listdir(out))  # killed while writing the very first checkpoint
        code, _, err = cli('gpt.py', training_args(folder) + ['--init_from=resume'])
        self.assertEqual(code, 2)
        self.assertIn('holds no checkpoint; use --init_from=scratch', err)
        code, stdout, err = cli('gpt.py', training_args(folder))  # what the error said: it works
        self.assertEqual(code, 0, err)
        self.assertEqual(next(csv_rows(os.path.join(out, 'log.csv')))['iter'], '0')  # log.csv starts afresh
        # A crash after the first ckpt.pt, during the first last.pt, leaves ckpt.pt alone: resume takes it.
        os.remove(os.path.join(out, 'last.pt'))
        best = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num']
        code, stdout, err = cli('gpt.py', training_args(folder, max_iters=14, lr_decay_iters=14) +
                                ['--init_from=resume'])
        self.assertEqual(code, 0, err)
        self.assertIn(f'resuming at iter {best}', stdout)

    def test_unsafe_or_broken_checkpoints_are_refused_with_a_reason(self):
        quiet(gpt.main, self.train_args(max_iters=2, lr_decay_iters=2))
        good = os.path.join(self.dir, 'out', 'ckpt.pt')
        ckpt = torch.load(good, weights_only=True)
        data = pathlib.Path(good).read_bytes()
        wrong_shape = {**ckpt, 'model_args': {**ckpt['model_args'], 'n_embd': 64}}
        cases = [('no whole gpt.py checkpoint .UnpicklingError', lambda p: torch.save({**ckpt, 'extra': argparse.Namespace(x=1)}, p)),
                 ('no whole gpt.py checkpoint', lambda p: pathlib.Path(p).write_bytes(data[:len(data) // 2])),
                 ('no whole gpt.py checkpoint', lambda p: pathlib.Path(p).write_text('just some text')),
                 ('no whole gpt.py checkpoint', lambda p: torch.save({'weights': torch.ones(2)}, p)),
                 ('no whole gpt.py checkpoint .*size mismatch', lambda p: torch.save(wrong_shape, p))]
        for i, (reason, write) in enumerate(cases):
            path = os.path.join(self.dir, f'{i}.pt')
            write(path)
            with self.subTest(reason), self.assertRaisesRegex(gpt.UserError, reason):
                gpt.load_model(path)

    def test_a_loss_of_nan_or_inf_stops_the_run_and_keeps_the_last_good_checkpoint(self):
        quiet(gpt.main, self.train_args(max_iters=6))
        checkpoints = [os.path.join(self.dir, 'out', name) for name in ('ckpt.pt', 'last.pt')]
        before = [torch.load(p, weights_only=True) for p in checkpoints]
        real_forward = gpt.GPT.forward
        for bad in ('nan', 'inf'):  # a check by math.isnan alone would let inf overwrite the checkpoints

            def bad_after_step_7(model, idx, targets=None, cache=None):
                logits, loss = real_forward(model, idx, targets, cache)
                bad_after_step_7.calls += model.training
                return logits, loss * float(bad) if bad_after_step_7.calls > 1 else loss
            bad_after_step_7.calls = 0
            with self.subTest(bad), mock.patch.object(gpt.GPT, 'forward', bad_after_step_7), \
                    self.assertRaises(SystemExit) as stop:
                quiet(gpt.main, self.train_args() + ['--init_from=resume'])
            self.assertRegex(str(stop.exception.code), rf"loss is {bad} at iter 8.*--learning_rate")
            for path, old in zip(checkpoints, before):  # the state of iter 6 (the resume evaluated it again)
                new = torch.load(path, weights_only=True)
                self.assertEqual((new['iter_num'], new['best_val_loss']), (old['iter_num'], old['best_val_loss']))
                self.assertTrue(all(torch.equal(new['model'][k], v) for k, v in old['model'].items()))
    def test_ctrl_c_or_sigterm_in_training_saves_a_checkpoint_that_resumes(self):
        real_step = gpt.train_step
        for sig in (signal.SIGINT, signal.SIGTERM):
            def step(model, optimizer, scaler, it):
                if it == 3:
                    os.kill(os.getpid(), sig)  # arrives during step 3: the run saves after it
                return real_step(model, optimizer, scaler, it)
            with mock.patch.object(gpt, 'train_step', step):
                code, out, err = cli('gpt.py', self.train_args(out=sig.name, max_iters=100, lr_decay_iters=100))
            self.assertEqual((code, err), (128 + sig, ''))
            self.assertIn(f'stopped by {sig.name} at iter 4; saved last.pt. Resume with: python gpt.py '
                          f'--init_from=resume --out_dir={self.dir}/{sig.name}', out)
            self.assertEqual(torch.load(f'{self.dir}/{sig.name}/last.pt', weights_only=True)['iter_num'], 4)
        log = output_of(gpt.main, self.train_args(out=sig.name, max_iters=6) + ['--init_from=resume'])
        self.assertIn('resuming at iter 4', log)

    def test_bad_inputs_fail_with_one_clear_line_and_change_no_file(self):
        d = self.dir
        quiet(gpt.main, self.train_args(out='run', max_iters=2, lr_decay_iters=2))
        os.makedirs(f'{d}/broken')
        truncated = pathlib.Path(f'{d}/run/last.pt').read_bytes()[:3000]
        for name in ('last.pt', 'ckpt.pt'):
            pathlib.Path(f'{d}/broken/{name}').write_bytes(truncated)
        os.makedirs(f'{d}/shape')
        ckpt = torch.load(f'{d}/run/ckpt.pt', weights_only=True)
        torch.save({**ckpt, 'model_args': {**ckpt['model_args'], 'n_layer': 3}}, f'{d}/shape/ckpt.pt')
        os.makedirs(f'{d}/empty_out')
        texts = {'empty.txt': b'', 'short.txt': b'too short', 'latin1.txt': 'caf\u00e9 '.encode('latin-1') * 50,
                 'huge_vocab.txt': ''.join(chr(c) for c in range(0x4E00, 0x4E00 + 70000)
                                           if not 0xD800 <= c < 0xE000).encode(),
                 'other.txt': b'abcdefghij' * 50}
        for name, data in texts.items():
            pathlib.Path(f'{d}/{name}').write_bytes(data)
        quiet(prepare.prepare, f'{d}/other.txt', f'{d}/other_data')
        for name, edit in (('no_meta', None), ('no_tokens', lambda m: m.pop('train_tokens')),
                           ('zero_chars', lambda m: m.update(val_chars=0)), ('bad_json', 'x')):
            quiet(prepare.prepare, self.input, f'{d}/{name}')
            meta_path = pathlib.Path(f'{d}/{name}/meta.json')
            if edit is None:
                meta_path.unlink()
            elif edit == 'x':
                meta_path.write_text('{"tokenizer": ')
            else:
                meta = json.loads(meta_path.read_text())
                edit(meta)
                meta_path.write_text(json.dumps(meta))
        quiet(prepare.prepare, self.input, f'{d}/short_val')  # a val split cut short by hand
        pathlib.Path(f'{d}/short_val/val.bin').write_bytes(pathlib.Path(f'{d}/short_val/val.bin').read_bytes()[:-2])
        for name, drop in (('no_config', 'config'), ('no_optimizer', 'optimizer')):  # hand-edited last.pt
            os.makedirs(f'{d}/{name}')
            torch.save({k: v for k, v in torch.load(f'{d}/run/last.pt', weights_only=True).items() if k != drop},
                       f'{d}/{name}/last.pt')
        pathlib.Path(f'{d}/tiny_train.txt').write_text('ab' * 900 + ''.join(chr(65 + i % 26) for i in range(200)))
        quiet(prepare.prepare, f'{d}/tiny_train.txt', f'{d}/tiny_train', 'bpe', 300)  # BPE: 'abab...' to a token
        os.symlink(f'{d}/nowhere', f'{d}/dangling')
        os.makedirs(f'{d}/a_folder')
        os.mkfifo(f'{d}/a_pipe')
        quiet(gpt.main, self.train_args(out='no_newline', data_dir=f'{d}/other_data', max_iters=2, lr_decay_iters=2))
        train = self.train_args(out='new')
        cases = [  # (script, arguments, words the one-line error must contain)
            ('gpt.py', train + [f'--data_dir={d}/tiny_train'], 'needs more than the 4 tokens of the train split; use --block_size=3'),
            ('gpt.py', train + [f'--out_dir={self.input}'], '(a file or a link has that name)'),
            ('gpt.py', train + [f'--out_dir={d}/dangling'], '(a file or a link has that name)'),
            ('gpt.py', train + ['--out_dir='], '--out_dir is empty; name a folder'),
            ('gpt.py', train + ['--warmup_iters=20'], '--lr_decay_iters=12 must be at least --warmup_iters=20'),
            ('gpt.py', train + ['--min_lr=1'], '--min_lr=1.0 must be at most --learning_rate=0.01'),
            ('gpt.py', train + ['--grad_clip=nan'], '--grad_clip=nan must be zero (no clipping) or more'),
            ('gpt.py', train + ['--weight_decay=inf'], '--weight_decay=inf must be zero or more, and finite'),
            ('prepare.py', [f'--input={d}/a_folder', f'--data_dir={d}/x'], 'is a folder; pass the path of a UTF-8'),
            ('prepare.py', [f'--input={d}/a_pipe', f'--data_dir={d}/x'], 'is not a regular file (a pipe?)'),
            ('sample.py', [f'--out_dir={d}/no_newline'], "vocabulary has no newline, the default start text; give"),
            ('gpt.py', train + [f'--data_dir={d}/short_val'], 'holds no whole prepare.py output'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/no_config'], "KeyError: 'config'"),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/no_optimizer'], "KeyError: 'optimizer'"),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/run', '--max_iters=1'],
             'is at iter 2 of --max_iters=1; to train on, resume with larger --max_iters'),
            ('gpt.py', train + ['--n_embd=30', '--n_head=4'], 'multiple of --n_head'),
            ('gpt.py', train + ['--n_layer=-1'], '--n_layer=-1 must be zero or more'),
            ('gpt.py', train + ['--n_head=0'], '--n_head=0 must be positive'),
            ('gpt.py', train + ['--batch_size=-1'], '--batch_size=-1 must be positive'),
            ('gpt.py', train + ['--max_iters=0'], '--max_iters=0 must be positive'),
            ('gpt.py', train + ['--learning_rate=0'], '--learning_rate=0.0 must be positive'),
            ('gpt.py', train + ['--learning_rate=nan'], '--learning_rate=nan must be positive'),
            ('gpt.py', train + ['--dropout=1'], '--dropout=1.0 must be in [0, 1)'),
            ('gpt.py', train + ['--eval_iters=0'], '--eval_iters=0 must be positive'),
            ('gpt.py', train + ['--block_size=5000'], '--block_size=5000 needs more than'),
            *[('gpt.py', train + [f'--device={dev}'], 'not available') for dev, here in
              (('cuda', torch.cuda.is_available()), ('mps', torch.backends.mps.is_available()), ('gpu', False))
              if not here],
            ('gpt.py', train + ['--dtype=float16'], "float16 (--dtype, or a resumed run's) needs a CUDA GPU"),
            ('gpt.py', train + ['--dtype=half'], '--dtype=half must be auto, float32'),
            ('gpt.py', train + [f'--out_dir={self.input}/sub'], 'cannot write to'),
            ('gpt.py', train + [f'--data_dir={d}/missing'], 'holds no whole prepare.py output'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/empty_out'], 'holds no checkpoint'),
            ('gpt.py', train + [f'--out_dir={d}/run'], 'already holds a checkpoint'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/run', '--n_layer=3'], 'a resumed run keeps its 2'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/run', f'--data_dir={d}/other_data'], 'vocabulary'),
            ('gpt.py', train + ['--init_from=resume', f'--out_dir={d}/broken'], 'no whole gpt.py checkpoint'),
            ('gpt.py', train + ['--n_layers=3'], 'unknown setting --n_layers=3; python gpt.py --help'),
            ('gpt.py', train + ['--n_layer=two'], "--n_layer=two: expected int"),
            ('gpt.py', train + ['--compile=maybe'], "--compile=maybe: expected true or false"),
            ('gpt.py', train + ['--init_from=continue'], 'must be scratch or resume'),
            *[('gpt.py', train + [f'--data_dir={d}/{name}'], 'holds no whole prepare.py output')
              for name in ('no_meta', 'no_tokens', 'zero_chars', 'bad_json')],
            ('prepare.py', [f'--input={d}/nope.txt', f'--data_dir={d}/x'], 'does not exist'),
            ('prepare.py', [f'--input={d}/empty.txt', f'--data_dir={d}/x'], 'has 0 characters'),
            ('prepare.py', [f'--input={d}/short.txt', f'--data_dir={d}/x'], 'needs at least'),
            ('prepare.py', [f'--input={d}/latin1.txt', f'--data_dir={d}/x'], 'not UTF-8'),
            ('prepare.py', [f'--input={d}/huge_vocab.txt', f'--data_dir={d}/x'], 'at most 65535'),
            ('prepare.py', [f'--input={d}/short.txt', '--tokenizer=wordpiece'], 'must be char or bpe'),
            ('sample.py', [f'--out_dir={d}/empty_out'], 'train a model first'),
            ('sample.py', [f'--out_dir={d}/broken'], 'no whole gpt.py checkpoint'),
            ('sample.py', [f'--out_dir={d}/shape'], 'loading state_dict'),
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
            ('sample.py', [f'--out_dir={d}/run', '--device=gpu'], 'not available'),
        ]
        before = snapshot(d)
        for script, args, words in cases:
            with self.subTest(script=script, args=args[-2:]):
                code, _, stderr = cli(script, args)
                self.assertEqual(code, 2, stderr)
                lines = stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, stderr)
                self.assertTrue(lines[0].startswith('error: '), lines[0])
                self.assertIn(words, lines[0])
        self.assertEqual(snapshot(d), before)

    def test_a_bare_resume_takes_the_shape_and_settings_of_the_run_from_its_checkpoint(self):
        out = os.path.join(self.dir, 'odd')
        real_step = gpt.train_step

        def stop_at_once(model, optimizer, scaler, it):  # SIGTERM during the first step: saved and exits after it
            if it == stop_at_once.first:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(model, optimizer, scaler, it)
        stop_at_once.first = 0
        odd = dict(n_layer=1, n_head=3, n_embd=24, block_size=12, batch_size=3, dropout=0.1, learning_rate=3e-3,
                   weight_decay=0.05, beta2=0.9, grad_clip=0.5, seed=7, warmup_iters=5, min_lr=1e-4,
                   max_iters=100, lr_decay_iters=90, eval_interval=50, eval_iters=3, log_interval=7)
        with mock.patch.object(gpt, 'train_step', stop_at_once):
            code, _, err = cli('gpt.py', self.train_args(out='odd', **odd))
            self.assertEqual((code, err), (128 + signal.SIGTERM, ''))
            first = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
            stop_at_once.first = first['iter_num']
            # the command the stop message prints (and --device=cpu, so that it runs on the CPU anywhere)
            code, stdout, err = cli('gpt.py', ['--init_from=resume', f'--out_dir={out}', '--device=cpu'])
        self.assertEqual((code, err), (128 + signal.SIGTERM, ''))
        self.assertIn(f"its own settings, 36 tokens per step, resuming at iter {first['iter_num']}", stdout)
        second = torch.load(os.path.join(out, 'last.pt'), weights_only=True)
        self.assertEqual(second['iter_num'], first['iter_num'] + 1)
        self.assertEqual(second['model_args'], first['model_args'])
        self.assertEqual({k: v for k, v in second['config'].items() if k != 'init_from'},
                         {k: v for k, v in first['config'].items() if k != 'init_from'})
        self.assertEqual({k: second['config'][k] for k in odd}, odd)

    def test_a_full_disk_mid_run_ends_in_one_line_and_keeps_the_checkpoints_whole(self):
        quiet(gpt.main, self.train_args(max_iters=6))
        before = snapshot(os.path.join(self.dir, 'out'))
        full = OSError(errno.ENOSPC, 'No space left on device')
        with mock.patch.object(gpt.os, 'fsync', side_effect=full):
            code, out, err = cli('gpt.py', self.train_args() + ['--init_from=resume'])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertRegex(err, r"^error: cannot write to .*out/ \(No space left on device\); its checkpoints are "
                              r"kept: once it is fixed, resume with python gpt.py --init_from=resume --out_dir=")
        for name in ('ckpt.pt', 'last.pt'):
            path = os.path.join(self.dir, 'out', name)
            self.assertEqual(pathlib.Path(path).read_bytes(), before[pathlib.Path(path)])
            kept = gpt.load_model(path, keys=('iter_num', 'best_val_loss'))  # whole: every key loads and fits
            self.assertIn(kept['iter_num'], (6,) if name == 'last.pt' else (0, 6))  # the run's, not the failed one's
            self.assertTrue(math.isfinite(kept['best_val_loss']))
        left = set(os.listdir(os.path.join(self.dir, 'out'))) - {p.name for p in before}
        self.assertLessEqual(left, {'ckpt.pt.tmp', 'last.pt.tmp'})  # the failed write; the next save replaces it


class TestDevicesAndRuns(DataDirTest):
    """What a GPU run does, checked on the CPU with torch.cuda stubbed: the real set_device and the others
    refuse what the real ones refuse. And the rules that keep runs apart."""

    def cuda_setup(self, capability, *args):  # gpt.setup as on a machine with one GPU of this compute capability
        self.addCleanup(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
        set_to = []
        def set_device(d):  # as torch.cuda.set_device: a device without an index is refused
            set_to.append(torch.cuda._utils._get_device_index(d, optional=False))
        stubs = dict(is_available=lambda: True, device_count=lambda: 1, set_device=set_device,
                     get_device_capability=lambda d=None: capability, mem_get_info=lambda d=None: (2 ** 37, 2 ** 37))
        with mock.patch.multiple(torch.cuda, **stubs):
            out = output_of(gpt.setup, gpt.parse_args([f'--data_dir={self.data_dir}', f'--out_dir={self.dir}/o',
                                                        *args], gpt.DEFAULTS, gpt.__file__))
        return set_to, out

    def test_the_cards_command_on_a_gpu_sets_an_indexed_device_and_trains_the_reference_model(self):
        set_to, _ = self.cuda_setup((9, 0), '--n_layer=6', '--device=cuda')
        self.assertEqual((set_to, gpt.device), ([0], 'cuda:0'))  # torch.cuda.set_device('cuda') raised here
        self.assertEqual({k: getattr(gpt, k) for k in gpt.GPU_RECIPE}, gpt.GPU_RECIPE)
        self.cuda_setup((9, 0), '--n_layer=2', '--batch_size=8')  # 'auto' picks the GPU; given settings stay
        self.assertEqual((gpt.device, gpt.n_layer, gpt.batch_size, gpt.n_embd), ('cuda:0', 2, 8, 384))
        gpt.setup(gpt.parse_args([f'--data_dir={self.data_dir}', '--device=cpu'], gpt.DEFAULTS, gpt.__file__))
        self.assertEqual((gpt.n_layer, gpt.n_embd, gpt.block_size), (2, 128, 64))  # the CPU defaults stay

    def test_bfloat16_only_where_the_gpu_has_it_and_compile_only_where_triton_can(self):
        for capability, dtype, compiled in (((9, 0), 'bfloat16', True), ((8, 0), 'bfloat16', True),
                                             ((7, 5), 'float16', True), ((6, 1), 'float16', False)):
            _, out = self.cuda_setup(capability)
            self.assertEqual((gpt.dtype, gpt.compile), (dtype, compiled), capability)
        gpt.setup(gpt.parse_args([f'--data_dir={self.data_dir}', '--device=cpu'], gpt.DEFAULTS, gpt.__file__))
        self.assertEqual((gpt.dtype, gpt.compile), ('float32', False))

    def test_compiling_each_block_changes_no_step_and_no_checkpoint_key(self):
        real_compile = torch.compile
        with mock.patch.object(torch, 'compile', lambda fn, **kw: real_compile(fn, backend='aot_eager', **kw)):
            steps = {}
            for compiled in (True, False):
                with mock.patch.multiple(gpt, compile=compiled, device='cpu', dtype='float32'):
                    gpt.setup(gpt.parse_args([f'--data_dir={self.data_dir}', '--device=cpu', '--n_layer=2',
                                              '--n_embd=32', '--block_size=16', '--batch_size=4'],
                                             gpt.DEFAULTS, gpt.__file__))
                    gpt.compile = compiled
                    model, optimizer, scaler = gpt.build(self.meta['vocab_size'])
                    steps[compiled] = [gpt.train_step(model, optimizer, scaler, it).item() for it in range(3)]
                    keys = list(model.state_dict())
                    self.assertEqual(all(hasattr(b, '_compiled_call_impl') and b._compiled_call_impl is not None
                                         for b in model.blocks), compiled)
                    self.assertFalse(any('_orig_mod' in k for k in keys))
        for a, b in zip(steps[True], steps[False]):
            self.assertAlmostEqual(a, b, places=5)

    def test_generate_at_temperature_zero_is_greedy_and_a_tiny_temperature_is_too(self):
        model = tiny_model()
        idx = torch.zeros((2, 1), dtype=torch.long)
        greedy = idx
        for _ in range(10):
            greedy = torch.cat((greedy, model(greedy[:, -8:])[0][:, -1].argmax(-1, keepdim=True)), dim=1)
        self.assertTrue(torch.equal(model.generate(idx, 10, temperature=0), greedy))
        self.assertTrue(torch.equal(model.generate(idx, 10, temperature=1e-30), greedy))

    def test_ctrl_c_in_a_script_says_so_in_one_line(self):
        def interrupted(argv):
            raise KeyboardInterrupt
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as stop:
            gpt.run_cli(interrupted, [])
        self.assertEqual((stop.exception.code, err.getvalue()), (130, 'error: stopped by Ctrl-C\n'))


def _one_process_of_two_with_a_fault(rank, fault, rendezvous, args, log):
    """A child: gpt.py's command line as process `rank` of two, as torchrun starts it (its variables set), the
    processes meeting through a file rather than a port, with `fault` in one of them; its output into log."""
    output = os.open(log, os.O_WRONLY | os.O_CREAT)
    for printed_to in (1, 2):  # stdout and stderr: to the log
        os.dup2(output, printed_to)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    init = dist.init_process_group
    dist.init_process_group = lambda backend: init(backend, init_method=f'file://{rendezvous}', rank=rank,
                                                   world_size=2)
    if fault == 'nan_on_rank_1' and rank == 1:  # process 1 alone sees a nan loss from its step 3 on
        forward = gpt.GPT.forward

        def nan_forward(model, idx, targets=None, cache=None):
            logits, loss = forward(model, idx, targets, cache)
            nan_forward.calls += model.training
            return logits, (loss * float('nan') if loss is not None and nan_forward.calls > 3 else loss)
        nan_forward.calls = 0
        gpt.GPT.forward = nan_forward
    if fault == 'full_disk_on_rank_0' and rank == 0:  # process 0's second save hits a full disk
        fsync, calls = os.fsync, []

        def full(fd):
            calls.append(fd)
            if len(calls) > 2:
                raise OSError(errno.ENOSPC, 'No space left on device')
            fsync(fd)
        gpt.os.fsync = full
    gpt.run_cli(gpt.main, args)


def two_processes_with_a_fault(folder, fault):
    """gpt.py's command line as two processes of one run (forked: they share this one's imports), training on
    folder/data, with `fault` in one of them: [(exit code, what it printed)] of each."""
    from torch import _dynamo  # noqa: F401  what torch imports at an optimizer's first step: here, once
    fork = multiprocessing.get_context('fork')
    logs = [os.path.join(folder, f'{fault}_{rank}.log') for rank in range(2)]
    children = [fork.Process(target=_one_process_of_two_with_a_fault, args=(
        rank, fault, os.path.join(folder, f'{fault}_rendezvous'), training_args(folder, fault, eval_interval=4),
        logs[rank])) for rank in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
        if child.exitcode is None:  # a hang: as subprocess.run's timeout would
            child.kill()
    return [(child.exitcode, pathlib.Path(log).read_text()) for child, log in zip(children, logs)]


class TestTorchrunAgreement(DataDirTest):
    """Under torchrun, processes agree: a fault in any one ends them all, in one line, instead of a hang."""

    def test_a_nan_on_one_process_or_a_full_disk_on_another_ends_every_process_with_one_line(self):
        for fault, line in (('nan_on_rank_1', 'error: the loss is nan at iter 4'),
                            ('full_disk_on_rank_0', 'error: cannot write to')):
            with self.subTest(fault):
                ended = launched(self.dir, two_processes_with_a_fault, fault)  # run ahead; a hang: the timeout
                self.assertTrue(all(code not in (0, None) for code, _ in ended), ended)  # both ended, failed
                printed = ''.join(log for _, log in ended)
                ours = [l for l in printed.splitlines() if l.startswith('error: ')]
                self.assertEqual(len(ours), 1, printed[-3000:])  # process 0 speaks for all
                self.assertTrue(ours[0].startswith(line), ours)
                self.assertNotIn('Traceback (most recent call last)', printed)


class TestTrainingSteps(DataDirTest):
    """What one optimizer step does: decay, clipping, the schedule, the batches, AdamW."""

    def test_weight_decay_pulls_matrices_and_embeddings_but_not_biases_or_layernorm_gains(self):
        model, optimizer, _ = built(weight_decay=0.1)
        decayed = {f'{name}.weight' for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
                   and name != 'lm_head'}  # lm_head.weight is tok_emb.weight
        names = {id(p): n for n, p in model.named_parameters()}
        in_groups = [names[id(p)] for g in optimizer.param_groups for p in g['params']]
        self.assertEqual(sorted(in_groups), sorted(names.values()))  # every parameter, once
        decay_of = {names[id(p)]: g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
        self.assertEqual({n for n, wd in decay_of.items() if wd == 0.1}, decayed)
        self.assertEqual({n for n, wd in decay_of.items() if wd != 0.1}, set(names.values()) - decayed)
        self.assertTrue(all(wd == 0.0 for n, wd in decay_of.items() if n not in decayed))
        self.assertTrue(any('ln' in n for n in set(names.values()) - decayed))  # LayerNorm gains and biases
        # What the optimizer does with it: with a zero gradient, AdamW's step is the decay alone.
        nudged(model, scale=1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for g in optimizer.param_groups:
            g['lr'] = 0.5
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for n, p in model.named_parameters():
            factor = 1 - 0.5 * 0.1 if n in decayed else 1.0
            self.assertTrue(torch.allclose(p.detach(), before[n] * factor, atol=1e-6), n)

    def test_a_gradient_larger_than_grad_clip_is_scaled_down_to_norm_grad_clip(self):
        batch = (torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(0)),
                 torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(1)))

        def update(grad_clip):  # the SGD step (lr 1) is minus the gradient that the step applied
            model = tiny_model().train()
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            a_step_of(model, torch.optim.SGD(model.parameters(), lr=1.0), 0, batch, grad_clip=grad_clip)
            return torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        free = update(0.0)  # off: the whole gradient
        clip = free.norm().item() / 100
        clipped = update(clip)
        self.assertAlmostEqual(clipped.norm().item(), clip, delta=clip * 1e-4)  # capped at grad_clip ...
        self.assertTrue(torch.allclose(clipped, free / 100, atol=1e-7))  # ... in the same direction
        self.assertTrue(torch.allclose(update(free.norm().item() * 2), free, atol=1e-7))  # a small one passes

    def test_every_param_group_steps_with_the_scheduled_lr(self):
        model, optimizer, _ = built()
        self.assertEqual(len(optimizer.param_groups), 2)
        seen = []
        real_step = optimizer.step

        def step(*args, **kwargs):  # the lr of each group when the optimizer moves the weights
            seen.append([g['lr'] for g in optimizer.param_groups])
            return real_step(*args, **kwargs)
        optimizer.step = step
        batch = (torch.randint(11, (2, 8)), torch.randint(11, (2, 8)))
        schedule = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=10, grad_clip=1.0)
        its = (0, 2, 4, 7, 9, 15)
        for it in its:
            a_step_of(model, optimizer, it, batch, **schedule)
        with mock.patch.multiple(gpt, **schedule):
            expected = [[gpt.get_lr(it)] * 2 for it in its]
        self.assertEqual(seen, expected)
        self.assertEqual(len({lrs[0] for lrs in expected}), len(its))  # six different rates

    def test_each_step_trains_on_its_own_batches_and_the_same_step_on_the_same_ones(self):
        drawn = []
        real_get_batch = gpt.get_batch

        def get_batch(split, starts=None):
            x, y = real_get_batch(split, starts)
            drawn.append(x)
            return x, y
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16).train()
        settings = dict(data_dir=self.data_dir, batch_size=4, block_size=16, device='cpu', dtype='float32', seed=1337,
                        rank=0, grad_clip=1.0, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_iters=0)
        with mock.patch.multiple(gpt, get_batch=get_batch, **settings):
            for it in (3, 4, 3):
                torch.rand(it)  # whatever ran before: the step's own seed decides
                gpt.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               torch.amp.GradScaler(enabled=False), it)
        self.assertTrue(torch.equal(drawn[0], drawn[2]))  # step 3 twice: the same rows
        self.assertFalse(torch.equal(drawn[0], drawn[1]))  # step 4: others
        self.assertGreater(len({row for x in drawn[:2] for row in map(tuple, x.tolist())}), 4)

    def test_fused_adamw_takes_the_same_steps_as_the_plain_one(self):
        """build's fused AdamW takes the steps of AdamW written out (decoupled decay, bias-corrected moments),
        with each group's lr and weight decay and the configured betas."""
        model, opt, _ = built(learning_rate=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.95)
        self.assertTrue(all(g['fused'] for g in opt.param_groups))
        params = [(p, g) for g in opt.param_groups for p in g['params']]
        mine = [p.detach().clone() for p, _ in params]
        m, v = [torch.zeros_like(p) for p in mine], [torch.zeros_like(p) for p in mine]
        for step in range(1, 4):
            idx = torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(step))
            model(idx, idx)[1].backward()
            for i, (p, g) in enumerate(params):
                (b1, b2), lr, eps = g['betas'], g['lr'], g['eps']
                mine[i] *= 1 - lr * g['weight_decay']
                m[i] = b1 * m[i] + (1 - b1) * p.grad
                v[i] = b2 * v[i] + (1 - b2) * p.grad ** 2
                mine[i] -= lr * (m[i] / (1 - b1 ** step)) / ((v[i] / (1 - b2 ** step)).sqrt() + eps)
            opt.step()
            opt.zero_grad()
            for i, (p, _) in enumerate(params):
                self.assertLess((p.detach() - mine[i]).abs().max().item(), 1e-6, (step, i))
        self.assertEqual({g['betas'] for g in opt.param_groups}, {(0.8, 0.95)})
        self.assertEqual(sorted(g['weight_decay'] for g in opt.param_groups), [0.0, 0.1])


class TestEvaluation(DataDirTest):
    """The eval: fixed windows with dropout off, its sample, and the best checkpoint."""

    def eval_settings(self):
        return dict(data_dir=self.data_dir, out_dir=os.path.join(self.dir, 'out'), batch_size=3, block_size=16,
                    eval_iters=2, device='cpu', dtype='float32', seed=1337, rank=0, world_size=1, learning_rate=1e-3,
                    warmup_iters=2, lr_decay_iters=12, min_lr=1e-4, max_iters=12, gradient_accumulation_steps=1)

    def test_the_eval_measures_the_model_with_dropout_off(self):
        thinned = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.5).train()
        plain = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.0)  # the same weights
        with mock.patch.multiple(gpt, **self.eval_settings()):
            first, second = (gpt.estimate_loss(thinned.train(), self.meta) for _ in range(2))
            without = gpt.estimate_loss(plain, self.meta)
        for split in ('train', 'val'):
            self.assertAlmostEqual(first[split], second[split], places=6)
            self.assertAlmostEqual(first[split], without[split], places=5)

    def test_two_evals_of_the_same_weights_print_the_same_sample(self):
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.2)
        samples = []
        with mock.patch.multiple(gpt, **self.eval_settings()):
            for seed in (1, 2):
                torch.manual_seed(seed)  # whatever drew random numbers before
                model.train()  # as training leaves it
                samples.append(gpt.evaluate(model, self.meta)[3])
        self.assertGreater(len(samples[0].strip()), 20)
        self.assertEqual(samples[0], samples[1])

    def test_ckpt_pt_keeps_the_best_val_and_a_worse_eval_never_overwrites_it(self):
        vals, saved, real_save = iter((2.0, 3.0, 2.5, 1.0, 1.0 + 1e-6)), [], gpt.Run.save

        def save(run, it, names):  # what each eval saves, and the state then on the disk
            real_save(run, it, names)
            best, last = (torch.load(os.path.join(self.dir, 'out', n), weights_only=True) for n in ('ckpt.pt', 'last.pt'))
            saved.append((names, best['iter_num'], best['best_val_loss'], last['iter_num'], last['best_val_loss']))
        with mock.patch.object(gpt, 'evaluate', lambda model, meta: (2.0, next(vals), 3.0, '')), \
                mock.patch.object(gpt.Run, 'save', save):
            quiet(gpt.main, self.train_args(max_iters=4, lr_decay_iters=4, eval_interval=1))
        both, last = ['ckpt.pt', 'last.pt'], ['last.pt']
        self.assertEqual(saved, [(both, 0, 2.0, 0, 2.0), (last, 0, 2.0, 1, 2.0), (last, 0, 2.0, 2, 2.0),
                                 (both, 3, 1.0, 3, 1.0), (last, 3, 1.0, 4, 1.0)])

    def test_each_eval_prints_a_sample_of_the_same_seed(self):
        log = output_of(gpt.main, self.train_args(max_iters=6, log_interval=100, seed=5))
        log = re.sub(r'(?m)^iter \d+/\d+: loss .*\n', '', log)  # the step lines: the last step logs
        evals = re.split(r'iter \d+: train loss .*\n', log)[1:]
        self.assertEqual(len(evals), 2)  # at iterations 0 and 6
        model, tok = gpt.load_model(os.path.join(self.dir, 'out', 'last.pt'))  # the weights of iter 6
        with mock.patch.multiple(gpt, device='cpu', compile=False):  # the weights of iter 0: build's, seed 5
            initial = gpt.build(self.meta['vocab_size'])[0].eval()
        for text, weights in zip(evals, (initial, model)):
            torch.manual_seed(5)
            expected = tok.decode(weights.generate(torch.zeros((1, 1), dtype=torch.long), 100)[0, 1:].tolist())
            self.assertEqual(text.strip(), expected.strip())
            self.assertGreater(len(text.strip()), 20)
        self.assertNotEqual(evals[0], evals[1])  # other weights, other text


def sgd_step_on(batches, accumulation=1):
    """The weights of tiny_model after one SGD step (lr 1) on the given micro-batches."""
    model = tiny_model().train()
    it = iter(batches)
    with mock.patch.multiple(gpt, get_batch=lambda split: next(it), grad_clip=0.0, dtype='float32', device='cpu',
                             gradient_accumulation_steps=accumulation, learning_rate=1.0, warmup_iters=0):
        gpt.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.amp.GradScaler(enabled=False), 0)
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
        """...each process accumulating two micro-batches: the gradients are averaged over processes once, after
        the last micro-batch (a sync after the first would leave the second one's unaveraged)."""
        b, rendezvous, out_path = launched(self.dir, ddp_step_on_two_processes)  # run ahead: see launched
        self.assertFalse(os.path.exists(rendezvous))  # the last process to leave removed it: both left cleanly
        combined = (torch.cat([x for x, _ in b]), torch.cat([y for _, y in b]))
        ddp, one = torch.load(out_path, weights_only=True), sgd_step_on([combined])
        for key in one:
            self.assertTrue(torch.allclose(ddp[key], one[key], atol=1e-6), key)
        self.assertFalse(all(torch.equal(ddp[k], v) for k, v in tiny_model().state_dict().items()))  # it moved

    def test_torchrun_with_two_cpu_processes_trains_and_saves_a_checkpoint_sample_py_reads(self):
        r, out_dir = launched(self.dir, torchrun_trains_on_two_cpu_processes)  # started ahead: see launched
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.assertIn('256 tokens per step', r.stdout)  # 4 x 16 x 2 micro-batches x 2 processes
        self.assertEqual(r.stdout.count('iter 4: train loss'), 1)  # only process 0 evaluates and reports
        self.assertEqual(torch.load(f'{out_dir}/last.pt', weights_only=True)['iter_num'], 4)
        out = output_of(sample.main, [f'--out_dir={out_dir}', '--start=Sing', '--num_samples=1',
                                      '--max_new_tokens=5', '--device=cpu'])
        self.assertEqual(out, expected_samples(out_dir, 'Sing', 1, 5)[0] + '\n')


class TestWatchingTraining(DataDirTest):

    def test_bench_plot_draws_one_point_per_eval_keeping_the_latest_row_of_a_repeated_step(self):
        quiet(gpt.main, self.train_args())
        with open(os.path.join(self.dir, 'out', 'log.csv'), 'a', encoding='utf-8') as f:
            f.write('6,9.0,9.5,9.9,0.001,\n')  # step 6 evaluated again, as after a resume: the latest row counts
        quiet(bench.main, ['plot', f'--out_dir={self.dir}/out'])
        svg = ElementTree.parse(os.path.join(self.dir, 'out', 'loss.svg')).getroot()  # well-formed XML
        lines = svg.findall('{http://www.w3.org/2000/svg}polyline')
        self.assertEqual([len(line.get('points').split()) for line in lines], [3, 3])  # train and val: 0, 6, 12
        ys = [[float(point.split(',')[1]) for point in line.get('points').split()] for line in lines]
        self.assertEqual(ys[1][1], min(ys[0] + ys[1]))  # val 9.5 at step 6, the highest loss: the chart's top
        code, _, err = cli_bench(['plot', f'--out_dir={self.dir}/missing'])
        self.assertEqual((code, len(err.strip().splitlines())), (2, 1), err)

    def test_bench_plot_leaves_out_a_non_finite_loss_reads_a_spreadsheets_bom_and_refuses_a_broken_row(self):
        out = os.path.join(self.dir, 'out')
        os.makedirs(out)
        header = 'iter,train_loss,val_loss,val_bpc,lr,tokens_per_s\n'
        logs = {'bom': '\ufeff' + header + '0,4.0,4.1,5.9,0.001,\n6,3.0,3.1,4.4,0.001,\n',
                'nan': header + '0,4.0,4.1,5.9,0.001,\n6,inf,3.1,4.4,0.001,\n12,2.0,nan,3.0,0.001,\n',
                'quote': header + '0,4.0,4.1,5.9,0.001,\n6,"3.0,3.1,4.4,0.001,\n12,2.0,2.1,3.0,0.001,\n',
                'short': header + '0,4.0,4.1\n'}
        for name, log in logs.items():
            with self.subTest(name):
                pathlib.Path(out, 'log.csv').write_text(log, encoding='utf-8')
                code, stdout, err = cli_bench(['plot', f'--out_dir={out}'])
                if name in ('quote', 'short'):  # rows would be lost silently: refused instead
                    self.assertEqual((code, len(err.strip().splitlines())), (2, 1), err)
                    self.assertIn('cannot be read as a gpt.py log', err)
                    continue
                self.assertEqual((code, err), (0, ''))
                svg = pathlib.Path(out, 'loss.svg').read_text(encoding='utf-8')
                self.assertNotIn('nan', svg.replace('font-family', ''))
                points = [p.get('points').split() for p in ElementTree.fromstring(svg).findall(
                    '{http://www.w3.org/2000/svg}polyline')]
                self.assertEqual([len(p) for p in points], [2, 2] if name == 'bom' else [1, 1])
                if name == 'nan':
                    self.assertIn('left out the evals at iter 6, 12: a loss of nan or inf', stdout)

    def test_log_csv_has_a_row_per_log_step_and_per_eval_and_a_resume_appends(self):
        clock, real_step = [1000.0], gpt.train_step

        def step(model, optimizer, scaler, it):  # every step takes 0.25 s of the clock; the rest none
            clock[0] += 0.25
            return real_step(model, optimizer, scaler, it)
        with mock.patch.object(gpt, 'time', mock.Mock(time=lambda: clock[0])), \
                mock.patch.object(gpt, 'train_step', step):
            quiet(gpt.main, self.train_args(max_iters=6, gradient_accumulation_steps=2, log_interval=2))
            log = output_of(gpt.main, self.train_args(gradient_accumulation_steps=2, log_interval=3) +
                            ['--init_from=resume'])
        rows = list(csv_rows(os.path.join(self.dir, 'out', 'log.csv')))
        steps = [int(r['iter']) for r in rows if r['val_loss'] == '']
        evals = [int(r['iter']) for r in rows if r['val_loss'] != '']
        self.assertEqual((steps, evals), ([2, 4, 6, 9, 12], [0, 6, 6, 12]))  # the resume evaluates iter 6 again
        # 4 x 16 tokens x 2 micro-batches per step, 0.25 s each: 512 tokens/s, whatever the log interval
        self.assertEqual([r['tokens_per_s'] for r in rows if r['val_loss'] == ''], ['512'] * 5)
        self.assertEqual(re.findall(r'(\d+) ms/iter, ([\d,]+) tok/s', log), [('250', '512')] * 2)


def csv_rows(path):
    with open(path, newline='', encoding='utf-8') as f:
        yield from csv.DictReader(f)


def recounted_bpe(ids, vocab_size):
    """BPE learned the slow, obvious way: recount every pair after each merge (what prepare.py did before)."""
    merges = []
    for new_id in range(256, vocab_size):
        counts = np.bincount(ids[:-1].astype(np.int64) * new_id + ids[1:])  # pair (a, b) -> a * new_id + b
        if counts.max() < 2:
            break
        pair = divmod(int(counts.argmax()), new_id)  # of equal counts the first, so the smallest pair
        fused, i = [], 0
        while i < len(ids):  # each occurrence of pair, left to right, becomes new_id: 'aaa' -> 'Na'
            hit = i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair
            fused.append(new_id if hit else ids[i])
            i += 2 if hit else 1
        ids = np.array(fused)
        merges.append(pair)
    return merges, ids


def open_in_a_read_only_folder(path, mode='r', **kwargs):  # as root, chmod would not stop the writes
    if str(path).endswith('.tmp'):
        raise OSError(errno.EROFS, 'Read-only file system', path)
    return open(path, mode, **kwargs)


def byte_ids(text):
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)


class TestBPELearning(unittest.TestCase):

    def test_bpe_learning_with_incremental_counts_gives_the_same_merges_and_ids_as_recounting(self):
        rng = random.Random(0)
        texts = ['aaaaa', 'aaaaaaaaab aaaa aaa aa a ' * 4, 'abababab abab cdcdcd ' * 5, TEXT[:2000],
                 'Ünïcödé — 漢字漢字, emoji 🙂🙂🙂, tabs\tand\r\nnewlines ' * 4,
                 *[''.join(rng.choice('aab ') for _ in range(400)) for _ in range(4)]]  # runs and many ties
        for text in texts:
            for vocab_size in (257, 300, 700):  # 700: most of these texts run out of repeated pairs first
                with self.subTest(text=text[:20], vocab_size=vocab_size):
                    merges, ids = quiet(prepare.train_bpe, byte_ids(text), vocab_size)
                    expected_merges, expected_ids = recounted_bpe(byte_ids(text), vocab_size)
                    self.assertEqual(merges, expected_merges)
                    self.assertEqual(ids.tolist(), expected_ids.tolist())
                    self.assertEqual(gpt.BPETokenizer(merges).encode(text), ids.tolist())

    def test_bpe_learns_8192_tokens_in_seconds_and_shows_its_progress(self):
        rng = random.Random(0)  # 100 KB of 3000 made-up words: enough repeated pairs for thousands of merges
        words = [''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=rng.randint(2, 9))) for _ in range(3000)]
        text = ' '.join(rng.choice(words) for _ in range(17000))[:100_000]
        start = time.perf_counter()
        log = output_of(prepare.train_bpe, byte_ids(text), 8192)  # recounting took minutes
        self.assertLess(time.perf_counter() - start, 15)
        self.assertRegex(log, r'learning merges: 4,096 of 7,936, the train text is down to [\d,]+ tokens')


class TestPrepareAndTheDisk(DataDirTest):
    """A failing prepare.py ends in one line, leaves no .tmp file, and keeps what the folder held."""

    def assert_failed_cleanly(self, code, err, before, words):
        self.assertEqual(code, 2, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertRegex(err, words)
        self.assertEqual(snapshot(self.data_dir), before)
        self.assertEqual([n for n in os.listdir(self.data_dir) if n.endswith('.tmp')], [])

    @unittest.skipUnless(os.path.exists('/dev/full'), 'needs /dev/full, a device that is always full')
    def test_a_full_disk_ends_in_one_line_keeps_the_old_data_and_leaves_no_tmp(self):
        before = snapshot(self.data_dir)
        real_open = open
        for tokenizer in ('char', 'bpe'):
            for full in ('train.bin.tmp', 'val.bin.tmp', 'meta.json.tmp'):
                def open_on_a_full_disk(path, mode='r', **kwargs):
                    if str(path).endswith(full):  # the .tmp file is made, then every write to it fails
                        real_open(path, mode, **kwargs).close()
                        path = '/dev/full'
                    return real_open(path, mode, **kwargs)
                with self.subTest(tokenizer=tokenizer, full=full), \
                        mock.patch.object(prepare, 'open', open_on_a_full_disk, create=True):
                    code, _, err = cli('prepare.py', [f'--input={self.input}', f'--data_dir={self.data_dir}',
                                                      f'--tokenizer={tokenizer}', '--vocab_size=300'])
                    self.assert_failed_cleanly(code, err, before, r'^error: cannot write to .*/data/ \(No space '
                                               r'left on device\); free some space.* or pass another --data_dir')

    def test_a_read_only_folder_ends_in_one_line_and_keeps_the_old_data(self):
        before = snapshot(self.data_dir)
        for tokenizer in ('char', 'bpe'):
            with self.subTest(tokenizer=tokenizer), \
                    mock.patch.object(prepare, 'open', open_in_a_read_only_folder, create=True):
                code, _, err = cli('prepare.py', [f'--input={self.input}', f'--data_dir={self.data_dir}',
                                                  f'--tokenizer={tokenizer}', '--vocab_size=300'])
                self.assert_failed_cleanly(code, err, before, r'^error: cannot write to .*/data/ '
                                                              r'\(Read-only file system\); ')

    def test_a_download_into_a_read_only_folder_ends_in_one_line_and_leaves_no_file(self):
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        os.remove('input.txt')
        with mock.patch.object(prepare.urllib.request, 'urlopen') as urlopen, \
                mock.patch.object(prepare, 'open', open_in_a_read_only_folder, create=True):
            urlopen.return_value.__enter__.return_value.read.return_value = TEXT.encode()
            code, _, err = cli('prepare.py', [])
        self.assertEqual((code, err), (2, 'error: cannot write input.txt (Read-only file system); free some space, '
                                          'or prepare a text of your own: python prepare.py --input=YOUR_TEXT.txt\n'))
        self.assertEqual(sorted(os.listdir(self.dir)), ['data'])

    def test_a_data_dir_that_is_a_file_ends_in_one_line_and_changes_no_file(self):
        before = snapshot(self.dir)
        for data_dir in (self.input, f'{self.input}/sub'):
            with self.subTest(data_dir=data_dir):
                code, _, err = cli('prepare.py', [f'--input={self.input}', f'--data_dir={data_dir}'])
                self.assertEqual(code, 2, err)
                self.assertEqual(err, f'error: cannot write to {data_dir}/ ('
                                      f'{"a file has that name" if data_dir == self.input else "Not a directory"}); '
                                      'free some space, make it writable or pass another --data_dir\n')
        self.assertEqual(snapshot(self.dir), before)

    def test_ctrl_c_while_preparing_leaves_no_tmp_and_keeps_the_old_data(self):
        before = snapshot(self.data_dir)
        real_read_chunks = prepare.read_chunks

        def stopped_while_encoding(path, progress=''):  # Ctrl-C after a few chunks of pass 2 were written
            for i, chunk in enumerate(real_read_chunks(path, progress)):
                if progress.startswith('pass 2') and i == 3:
                    raise KeyboardInterrupt
                yield chunk
        for tokenizer, patch in (('char', mock.patch.object(prepare, 'read_chunks', stopped_while_encoding)),
                                 ('bpe', mock.patch.object(prepare, 'train_bpe', side_effect=KeyboardInterrupt))):
            with self.subTest(tokenizer=tokenizer), patch, mock.patch.object(prepare, 'CHUNK', 100):
                code, _, err = cli('prepare.py', [f'--input={self.input}', f'--data_dir={self.data_dir}',
                                                  f'--tokenizer={tokenizer}'])
                self.assertEqual((code, err), (130, 'error: stopped by Ctrl-C\n'))
                self.assertEqual(snapshot(self.data_dir), before)

    def test_help_shows_how_to_run_it_every_setting_and_what_bpe_costs(self):
        code, out, _ = cli('prepare.py', ['--help'])
        self.assertEqual(code, 0)
        self.assertIn('python prepare.py --tokenizer=bpe --vocab_size=1024', out)
        for key in ('input', 'data_dir', 'tokenizer', 'vocab_size'):
            self.assertIn(f'--{key}=', out)
        self.assertRegex(out, r'--vocab_size=1024 .*\d s .*8192')


def ctrl_c_during_bench_target(folder):
    """`python bench.py target` on folder/data, sent Ctrl-C once gpt.py trains: (the number of temporary
    folders then, its exit code, its stderr, the temporary folders left)."""
    scratch = os.path.join(folder, 'tmp')
    os.makedirs(scratch)
    tiny = dict(data_dir=os.path.join(folder, 'data'), device='cpu', n_layer=1, n_head=2, n_embd=16, block_size=16,
                batch_size=4, eval_iters=2, warmup_iters=2, max_iters=100000, lr_decay_iters=100000)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'bench.py'), 'target', '--target_loss=0.01',
                             *(f'--{k}={v}' for k, v in tiny.items())], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENVIRONMENT, 'TMPDIR': scratch})
    for line in proc.stdout:
        if ' s  iter 0: ' in line:  # gpt.py is training
            break
    training = len(os.listdir(scratch))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return training, proc.returncode, stderr, os.listdir(scratch)


def table_rows(text):  # the rows of the Markdown tables in text, as lists of cells
    return [[c.strip() for c in line.strip().strip('|').split('|')] for line in text.splitlines()
            if line.startswith('| ') and not line.startswith('| --')]


class TestBench(DataDirTest):

    def tiny(self, **overrides):  # gpt.py settings for bench.py train and target: a tiny model on the CPU
        args = {**dict(data_dir=self.data_dir, device='cpu', n_layer=1, n_head=2, n_embd=16, block_size=16,
                       batch_size=4, eval_iters=2, warmup_iters=2), **overrides}
        return [f'--{k}={v}' for k, v in args.items()]

    def test_bench_settings_that_cannot_work_end_in_one_line_naming_the_setting(self):
        for args, named in [(['train', '--iters=0'], '--iters=0'), (['train', '--repeats=0'], '--repeats=0'),
                            (['train', '--warmup=-1'], '--warmup=-1'), (['sample', '--new_tokens=0'], '--new_tokens=0'),
                            (['sample', '--n_head=5'], '--n_head=5'), (['sample', '--vocab_size=0'], '--vocab_size=0'),
                            (['target', '--limit_s=0'], '--limit_s=0'), (['target', '--target_loss=nan'], 'nan'),
                            (['target', f'--out_dir={self.dir}/x'], '--out_dir'),
                            (['train', '--init_from=resume'], '--init_from'), (['gpu', '--dry=maybe'], '--dry'),
                            ([], 'python bench.py {train|target|sample|plot|gpu}'), (['trian'], '--help')]:
            code, out, err = cli_bench(args)
            self.assertEqual((code, out, len(err.splitlines())), (2, '', 1), (args, err))
            self.assertTrue(err.startswith('error: ') and named in err, (args, err))
        self.assertEqual(sorted(os.listdir(self.dir)), ['data', 'input.txt'])  # nothing was written

    def test_bench_help_lists_every_mode_with_its_keys_and_exits_0(self):
        code, out, err = cli_bench(['--help'])
        self.assertEqual((code, err), (0, ''))
        for mode, (defaults, _) in {'train': (bench.TRAIN, 0), 'target': (bench.TARGET, 0), 'sample': (bench.SAMPLE, 0),
                                    'plot': (bench.PLOT, 0), 'gpu': (bench.GPU, 0)}.items():
            self.assertIn(f'\n{mode}:', out)
            for key, value in defaults.items():
                self.assertRegex(out, rf"--{key}={re.escape(repr(value))} +\S")  # with what it means
        self.assertEqual(cli_bench(['train', '--help'])[:2], (0, out))
        done = run('bench.py', '--help')
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, out, ''))

    def test_bench_plot_into_a_folder_it_cannot_write_ends_in_one_line(self):
        out_dir = os.path.join(self.dir, 'out')
        os.makedirs(out_dir)
        pathlib.Path(out_dir, 'log.csv').write_text('iter,train_loss,val_loss,val_bpc,lr,tokens_per_s\n'
                                                    '0,4.1,4.2,6.0,0.001,\n10,3.1,3.2,4.6,0.001,\n')
        real_open = open

        def read_only(path, mode='r', *args, **kwargs):  # tests run as root, who may write anywhere
            if 'w' in mode:
                raise PermissionError(errno.EACCES, 'Permission denied', path)
            return real_open(path, mode, *args, **kwargs)
        with mock.patch('bench.open', read_only, create=True):
            code, out, err = cli_bench(['plot', f'--out_dir={out_dir}'])
        self.assertEqual((code, out, len(err.splitlines())), (2, '', 1), err)
        self.assertIn(f'cannot write {out_dir}/loss.svg (Permission denied)', err)
        self.assertEqual(os.listdir(out_dir), ['log.csv'])

    def test_bench_train_and_target_leave_no_temporary_folder_behind(self):
        scratch = os.path.join(self.dir, 'tmp')
        os.makedirs(scratch)
        cache = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
        with mock.patch.object(tempfile, 'tempdir', scratch):
            code, out, err = cli_bench(['train', *self.tiny(), '--iters=2', '--warmup=1', '--repeats=1'])
            self.assertEqual((code, err), (0, ''))
            self.assertIn('ms/iter (median)', out)
            code, out, err = cli_bench(['target', *self.tiny(max_iters=100000, lr_decay_iters=100000, eval_interval=3,
                                                             log_interval=1), '--target_loss=100'])
            self.assertEqual((code, err), (0, ''))
        self.assertEqual((os.listdir(scratch), os.environ.get('TORCHINDUCTOR_CACHE_DIR')), ([], cache))
        # bench.py target stops gpt.py at its first eval at or below the target: here iter 0, before any step
        self.assertRegex(out, r'\| val loss <= 100.0: reached at iter 0 \(val loss \d\.\d+\) +\| \d+\.\d +\|')
        self.assertRegex(out, r'\| first step line \(iter -, compile included\) +\| - +\|')
        self.assertRegex(out, r'\n +\d+\.\d\d s  iter 0: train loss ')  # each line, time-stamped

    def test_bench_target_reports_a_target_that_gpt_py_never_reaches(self):
        cfg = {**bench.TARGET, 'target_loss': 100.0, 'data_dir': self.data_dir, 'device': 'cpu', 'n_layer': 1,
               'n_head': 2, 'n_embd': 16, 'block_size': 16, 'batch_size': 4, 'eval_iters': 2, 'log_interval': 1,
               'max_iters': 100000, 'lr_decay_iters': 100000, 'eval_interval': 3, 'warmup_iters': 2}
        with contextlib.redirect_stdout(io.StringIO()) as out:  # a target never reached: gpt.py ends by itself
            found = bench.bench_target({**cfg, 'target_loss': 0.01, 'max_iters': 6, 'lr_decay_iters': 6})
        self.assertEqual((found['iter'], found['first_step_iter'], 'target_s' in found), (6, 1, False))
        self.assertIn('not reached: gpt.py ended with exit code 0', out.getvalue())

    def test_bench_target_passes_on_the_line_of_a_setting_gpt_py_refuses(self):
        code, _, err = cli_bench(['target', *self.tiny(n_head=3)])
        self.assertEqual((code, err), (2, 'error: --n_embd=16 must be a multiple of --n_head\n'))

    def test_ctrl_c_during_bench_target_stops_gpt_py_and_deletes_its_folder(self):
        training, returncode, stderr, left = launched(self.dir, ctrl_c_during_bench_target)  # see launched
        self.assertEqual(training, 1)  # while gpt.py trained, its temporary folder was there
        self.assertEqual((returncode, stderr, left), (130, 'error: stopped by Ctrl-C\n', []))

    def test_cuda_tests_are_counted_from_the_unittest_report_and_the_compiled_test_found(self):
        self.assertIn(bench.COMPILE_TEST, unittest.defaultTestLoader.getTestCaseNames(TestCUDA))

        def report(compiled_passes, skip=False):  # what `python -m unittest -v` prints for two such tests
            cuda = type('TestCUDA', (unittest.TestCase,), {
                'test_kv_cache_matches_full_recompute': lambda self: None,
                bench.COMPILE_TEST: lambda self: self.assertTrue(compiled_passes)})
            stream = io.StringIO()
            unittest.TextTestRunner(stream, verbosity=2).run(unittest.defaultTestLoader.loadTestsFromTestCase(
                unittest.skip('needs a CUDA GPU')(cuda) if skip else cuda))
            return subprocess.CompletedProcess([], 0, '', stream.getvalue())
        for done, counts in [(report(True), {'ran': 2, 'passed': 2, 'skipped': 0, 'compiled': 'passed'}),
                             (report(False), {'ran': 2, 'passed': 1, 'skipped': 0, 'compiled': 'failed'}),
                             (report(True, skip=True), {'ran': 2, 'passed': 0, 'skipped': 2, 'compiled': 'skipped'})]:
            with mock.patch.object(subprocess, 'run', return_value=done) as ran:
                self.assertEqual(quiet(bench.cuda_tests), counts)
            self.assertIn('test_gpt.TestCUDA', ran.call_args[0][0])

    def test_bench_gpu_puts_every_figure_against_its_target_in_one_table(self):
        figures = {
            'time_startup': {'import_s': 1.5, 'init_s': 0.5},
            'bench_target': {'first_line_s': 3.0, 'first_step_s': 9.0, 'first_step_iter': 50, 'target_s': 25.0},
            'bench_sample': {'tokens_per_s': 2500.0, 'speedup': 3.0, 'same_text': True},
            'cuda_tests': {'ran': 5, 'passed': 5, 'skipped': 0, 'compiled': 'passed'}}
        train = [{'ms': 11.0, 'first_s': 12.0, 'mfu': 40.0, 'peak_gib': 3.0}, {'ms': 20.0, 'first_s': 1.0, 'mfu': 22.0,
                                                                                'peak_gib': 3.5}]
        with contextlib.ExitStack() as stack:
            for name, value in figures.items():
                stack.enter_context(mock.patch.object(bench, name, return_value=value))
            stack.enter_context(mock.patch.object(bench, 'bench_train', side_effect=train))
            code, out, err = cli_bench(['gpu', '--dry=true'])
        self.assertEqual((code, err), (0, ''))
        rows = {r[0]: r[1:] for r in table_rows(out.split('## All figures')[1])}
        self.assertEqual(rows['training step at the reference size, compiled, ms/iter'],
                         ['11.0', '<= 12 (nanoGPT: 17.8)', 'met'])
        self.assertEqual(rows['first step, compiling from a cold cache, s'], ['12.0', '<= 10', 'MISSED'])
        self.assertEqual(rows['training step, eager, ms/iter'], ['20.0', '', ''])
        self.assertEqual(rows["card's command: first step line (iter 50, compile included), s"], ['9.0', '', ''])
        self.assertEqual(rows['generation with the KV cache, batch 1, tokens/s'], ['2,500', '>= 3,000', 'MISSED'])
        self.assertEqual(rows['KV cache speed-up over recompute, x'], ['3.0', '>= 2', 'met'])
        self.assertEqual(rows['CUDA unit tests (test_gpt.TestCUDA) passed'], ['5 of 5', 'all', 'met'])
        self.assertEqual(rows['compiled and eager losses within tolerance (TestCUDA)'], ['passed', 'passed', 'met'])
        self.assertEqual(len(rows), 16)  # the header and 15 figures
        figures['bench_target'] = {'first_line_s': 3.0, 'iter': 2000, 'val': 1.4812}  # ended above the target
        with contextlib.ExitStack() as stack:
            for name, value in figures.items():
                stack.enter_context(mock.patch.object(bench, name, return_value=value))
            stack.enter_context(mock.patch.object(bench, 'bench_train', side_effect=train))
            rows = {r[0]: r[1:] for r in table_rows(cli_bench(['gpu', '--dry=true'])[1].split('## All figures')[1])}
        self.assertEqual(rows["card's command: val loss <= 3.6, s"],
                         ['not reached (last eval: iter 2000, val 1.4812)', '<= 60', 'MISSED'])

    def test_bench_gpu_still_prints_its_table_when_a_step_fails_and_then_exits_with_one_line(self):
        with mock.patch.object(bench, 'bench_sample', side_effect=RuntimeError('CUDA error: out of memory')), \
                mock.patch.object(bench, 'bench_train', return_value={'ms': 11.0, 'first_s': 5.0, 'mfu': 40.0,
                                                                       'peak_gib': 3.0}), \
                mock.patch.object(bench, 'time_startup', return_value={'import_s': 1.5, 'init_s': 0.5}), \
                mock.patch.object(bench, 'bench_target', return_value={}), \
                mock.patch.object(bench, 'cuda_tests', return_value={'ran': 5, 'passed': 5, 'skipped': 0,
                                                                     'compiled': 'passed'}), \
                contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err, \
                self.assertRaises(SystemExit) as stop:
            bench.main(['gpu', '--dry=true'])
        self.assertEqual(stop.exception.code, 'error: KV cache and recompute give the same text; a step failed: '
                                              'see its traceback above')
        self.assertIn('RuntimeError: CUDA error: out of memory', err.getvalue())
        rows = {r[0]: r[1:] for r in table_rows(out.getvalue().split('## All figures')[1])}
        self.assertEqual(rows['generation with the KV cache, batch 1, tokens/s'], ['failed', '>= 3,000', 'MISSED'])
        self.assertEqual(rows['KV cache and recompute give the same text'], ['failed', 'yes', 'MISSED'])
        self.assertEqual(rows['training step at the reference size, compiled, ms/iter'][2], 'met')


class TestGenerationWithTheStaticCache(unittest.TestCase):

    def test_a_prompt_fed_through_the_cache_in_chunks_of_any_length_gives_the_logits_of_one_whole_forward(self):
        idx = torch.randint(11, (2, 16))
        for flash in (True, False):
            model = tiny_model(block_size=16, flash=flash)
            whole = model(idx)[0]  # (2, 16, 11)
            for chunk in (1, 2, 3, 5, 16):
                with self.subTest(flash=flash, chunk=chunk), torch.inference_mode():
                    cache = sample.KVCache(model.config)
                    cache.clear(idx.device)
                    parts = []
                    for i in range(0, 16, chunk):
                        parts.append(model(idx[:, i:i + chunk], cache=cache)[0])
                        cache.advance(parts[-1].shape[1])
                    self.assertLess((torch.cat(parts, dim=1) - whole).abs().max().item(), 1e-5)

    def test_the_cache_writes_in_place_at_one_size_so_a_cuda_graph_can_replay_its_step(self):
        model = tiny_model(block_size=8)
        seen = set()
        append = sample.LayerCache.append

        def spy(layer, k, v):  # what attention gets from the cache, step after step
            keys, values, mask = append(layer, k, v)
            seen.add((keys.data_ptr(), values.data_ptr(), keys.shape, mask.shape[1], layer.cache.length.data_ptr()))
            return keys, values, mask
        with mock.patch.object(sample.LayerCache, 'append', spy):
            sample.beam_search(model, torch.randint(11, (1, 3)), 20, beams=3)  # past block_size, reordered
        self.assertEqual(len(seen), model.config.n_layer)  # one buffer pair, one shape, one length per layer
        self.assertEqual({s[2:4] for s in seen}, {((3, 2, 8, 8), 8)})

    def test_any_temperature_above_zero_samples_and_a_tiny_one_is_greedy(self):
        model = tiny_model()
        idx = torch.zeros((2, 1), dtype=torch.long)
        greedy = sample.sample(model, idx, 20, temperature=0)
        for t in (1e-40, 1e-30):
            cold = sample.sample(model, idx, 20, temperature=t, generator=torch.Generator().manual_seed(1))
            self.assertTrue(torch.equal(cold, greedy))
        hot = sample.sample(model, idx, 20, temperature=1e30, generator=torch.Generator().manual_seed(1))
        self.assertEqual(hot.shape, (2, 21))  # every token as likely as any other, none nan

    def test_beam_search_with_more_beams_than_tokens_keeps_the_best_text(self):
        model = tiny_model(vocab_size=5, seed=3)
        idx = torch.randint(5, (1, 2))

        def logprob(seq):
            logits = model(seq[:, :-1])[0]
            return torch.log_softmax(logits, -1)[0, 1:].gather(1, seq[0, 2:, None]).sum().item()
        wide, narrow = (sample.beam_search(model, idx, 4, beams=b) for b in (12, 5))  # 12 > 5 tokens at step 1
        self.assertEqual(wide.shape, (1, 6))
        self.assertGreaterEqual(logprob(wide), logprob(narrow) - 1e-6)


class TestSampleCommandLine(DataDirTest):

    def test_a_seed_out_of_range_or_a_batch_too_big_for_memory_fails_in_one_line(self):
        model, tok = tiny_model(vocab_size=13), PieceTokenizer()
        cases = [(['--seed=18446744073709551616'], '--seed=18446744073709551616 must be 0 or more and below 2**63'),
                 (['--seed=-1'], '--seed=-1 must be 0 or more'),
                 (['--num_samples=1000000000000'], 'out of memory; lower --num_samples (or --beams) or --max_new'),
                 (['--beams=1000000000000'], 'out of memory; lower --num_samples (or --beams)'),
                 (['--beams=2', '--length_penalty=nan'], '--length_penalty=nan must be a finite number')]
        with mock.patch.object(sample, 'load_model', lambda path, device: (model, tok)):
            for args, words in cases:
                with self.subTest(args=args):
                    code, _, stderr = cli('sample.py', [f'--out_dir={self.dir}/none', '--device=cpu', *args])
                    self.assertEqual(code, 2, stderr)
                    self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
                    self.assertTrue(stderr.startswith('error: '), stderr)
                    self.assertIn(words, stderr)
            code, stdout, stderr = cli('sample.py', ['--device=cpu', f'--seed={2 ** 63 - 1}', '--max_new_tokens=5'])
            self.assertEqual((code, stderr), (0, ''))

    def test_a_file_prompt_keeps_its_line_endings_and_a_run_with_only_last_pt_samples_from_it(self):
        crlf = os.path.join(self.dir, 'crlf.txt')
        pathlib.Path(crlf).write_bytes(TEXT.replace('\n', '\r\n').encode())
        quiet(prepare.prepare, crlf, os.path.join(self.dir, 'crlf'))  # a model that knows \r
        quiet(gpt.main, self.train_args(data_dir=os.path.join(self.dir, 'crlf'), max_iters=2, lr_decay_iters=2,
                                        grad_clip='inf'))  # inf: no clipping, accepted
        out = os.path.join(self.dir, 'out')
        os.remove(os.path.join(out, 'ckpt.pt'))  # only last.pt: sample.py takes it
        prompt = os.path.join(self.dir, 'prompt.txt')
        pathlib.Path(prompt).write_bytes(b'Sing the\r\nTell')
        code, stdout, err = cli('sample.py', [f'--out_dir={out}', f'--start=FILE:{prompt}', '--num_samples=1',
                                              '--max_new_tokens=5', '--device=cpu'])
        self.assertEqual((code, err), (0, ''))
        self.assertTrue(stdout.startswith('Sing the\r\nTell'), repr(stdout))

    def test_sample_py_piped_into_a_reader_that_leaves_early_ends_quietly(self):  # python sample.py | head -c 20
        quiet(gpt.main, self.train_args(max_iters=2, lr_decay_iters=2))
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'sample.py'), f'--out_dir={self.dir}/out',
                                 '--num_samples=1', '--max_new_tokens=100000', '--device=cpu'],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(len(proc.stdout.read(20)), 20)
        proc.stdout.close()  # the reader leaves
        with proc.stderr:
            stderr = proc.stderr.read().decode()
        self.assertEqual((proc.wait(timeout=60), stderr), (141, ''))


TINY = dict(device='cpu', dtype='float32', compile=False, seed=0, block_size=8, n_layer=2, n_head=2, n_embd=16,
            dropout=0.0, flash=True, learning_rate=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.99)


def built(**settings):
    """gpt.build(11) -> (model, optimizer, scaler) with the TINY settings, and these."""
    with mock.patch.multiple(gpt, **{**TINY, **settings}):
        return gpt.build(11)


def a_step_of(model, optimizer, it, batch, **settings):
    """gpt.train_step at step `it` on this one batch, with these settings (lr 1 by default, no clipping)."""
    settings = {**dict(get_batch=lambda split: batch, grad_clip=0.0, dtype='float32', device='cpu',
                       gradient_accumulation_steps=1, learning_rate=1.0, warmup_iters=0, lr_decay_iters=100,
                       min_lr=0.1, seed=1337, rank=0), **settings}
    with mock.patch.multiple(gpt, **settings):
        return gpt.train_step(model, optimizer, torch.amp.GradScaler(enabled=False), it)


def written_out_forward(model, idx):
    """GPT.forward written from scratch with the model's weights: the logits (B, T, V)."""
    cfg = model.config
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh

    def ln(x, m):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias

    def linear(x, m):
        return x @ m.weight.T + (0 if m.bias is None else m.bias)

    x = model.tok_emb.weight[idx] + model.pos_emb.weight[:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for blk in model.blocks:
        q, k, v = (t.reshape(B, T, nh, hs).transpose(1, 2) for t in linear(ln(x, blk.ln1), blk.attn.qkv).split(C, -1))
        att = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~causal, float('-inf')).softmax(-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, C), blk.attn.proj)
        h = linear(ln(x, blk.ln2), blk.ffwd.fc)
        x = x + linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), blk.ffwd.proj)  # exact GELU
    return ln(x, model.ln_f) @ model.tok_emb.weight.T  # lm_head shares the token embedding


def nudged(model, scale=0.1, seed=0):
    """The model with every weight moved by a little noise: biases nonzero, LayerNorm gains off 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _one_ddp_step_leaving_together(rank, world_size, rendezvous, batches, out_path):
    """_one_ddp_step, made to leave cleanly: DDP sits in a reference cycle, so unless it is collected before
    destroy_process_group, its gloo process group lives on until the interpreter exits, and tearing it down
    there aborts the process (SIGABRT, 'terminate called without an active exception') when the other process
    is still connected; a loaded machine makes that likely. Collected first, then a barrier: both leave whole."""
    torch.set_num_threads(1)  # two processes and the test runner on a shared machine
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world_size)
    model = tiny_model().train()  # the same seed: the same weights on every rank
    ddp = DDP(model)
    micro = iter(batches[rank])  # this rank's micro-batches
    with mock.patch.multiple(gpt, get_batch=lambda split: next(micro), grad_clip=0.0, dtype='float32', device='cpu',
                             gradient_accumulation_steps=len(batches[rank]), learning_rate=1.0, warmup_iters=0):
        gpt.train_step(ddp, torch.optim.SGD(model.parameters(), lr=1.0), torch.amp.GradScaler(enabled=False), 0)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    del ddp
    gc.collect()  # the process group dies in destroy_process_group, not at exit
    dist.barrier()
    dist.destroy_process_group()


def ddp_step_on_two_processes(folder):
    """One DDP step on two processes, each on two micro-batches of four: (the four, the file the processes met
    through, the weights process 0 saved). The processes are forked: they share this one's imports."""
    g = torch.Generator().manual_seed(1)
    b = [(torch.randint(11, (2, 8), generator=g), torch.randint(11, (2, 8), generator=g)) for _ in range(4)]
    out_path = os.path.join(folder, 'ddp.pt')
    rendezvous = os.path.join(folder, 'rendezvous')  # a file the processes meet through: no port to clash
    # torch imports its compiler at an optimizer's first step; imported in a process while its process group is
    # up, it keeps the group, and so the rendezvous file, to the end of the process: here, not in each child
    from torch import _dynamo  # noqa: F401
    torch.multiprocessing.start_processes(_one_ddp_step_leaving_together, nprocs=2, start_method='fork',
                                          args=(2, rendezvous, [b[:2], b[2:]], out_path))
    return b, rendezvous, out_path


def torchrun_trains_on_two_cpu_processes(folder):
    """torchrun of gpt.py on two CPU processes, training on folder/data: (the launch, its out_dir)."""
    return completed([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                      os.path.join(HERE, 'gpt.py'), *training_args(folder, max_iters=4, lr_decay_iters=4,
                                                                    gradient_accumulation_steps=2)],
                     cwd=HERE, OMP_NUM_THREADS='1'), os.path.join(folder, 'out')


def expected_samples(out_dir, start, num_samples, max_new_tokens, temperature=0.8, top_k=200, seed=1337):
    """The texts sample.py must print for these settings: the model of out_dir/ckpt.pt, sampled with the seed."""
    model, tok = gpt.load_model(out_dir)
    idx = torch.tensor([tok.encode(start)] * num_samples)
    out = sample.sample(model, idx, max_new_tokens, temperature, top_k,
                        generator=torch.Generator().manual_seed(seed))
    return [tok.decode(row) for row in out.tolist()]


def stdout_over_a_pipe(unbuffered):
    """(the read end of a new pipe, a text stdout writing into it) as Python sets up sys.stdout for a pipe:
    block-buffered, or written through with PYTHONUNBUFFERED set."""
    read_fd, write_fd = os.pipe()
    raw = io.FileIO(write_fd, 'w')
    stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding='utf-8',
                              write_through=unbuffered)
    return read_fd, stream


class TestWhatAFailureToPrintDoes(DataDirTest):
    """A failure to print is never a failure of the run: a reader that leaves stops it cleanly, as `| head`
    intends, with its checkpoint saved first; a full or closed stdout is ignored; a terminal that cannot
    encode a character shows a replacement instead."""

    def run_with_stdout(self, stream, script, args, **kwargs):
        """run_cli(script's main, args) with sys.stdout = stream (and stderr captured): (exit code, stderr)."""
        err = io.StringIO()
        main = {'gpt.py': gpt.main, 'prepare.py': prepare.main, 'sample.py': sample.main}[script]
        with mock.patch.object(sys, 'stdout', stream), contextlib.redirect_stderr(err):
            try:
                gpt.run_cli(main, args, **kwargs)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, err.getvalue()

    def test_gpt_py_piped_into_a_reader_that_leaves_early_stops_there_and_saves_last_pt(self):
        for unbuffered in (True, False):  # PYTHONUNBUFFERED set, and unset (as on most machines)
            with self.subTest(unbuffered=unbuffered):
                read_fd, stream = stdout_over_a_pipe(unbuffered)
                first = []

                def head_1():  # `| head -1`: one line, then the reader leaves
                    with open(read_fd, 'rb') as reader:
                        first.append(reader.readline())
                out = os.path.join(self.dir, f'head{unbuffered}')
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    pool.submit(head_1)
                    code, err = self.run_with_stdout(stream, 'gpt.py', self.train_args(
                        out=out, max_iters=100000, lr_decay_iters=100000, log_interval=1, eval_interval=100000))
                with contextlib.suppress(OSError):
                    stream.close()
                self.assertEqual(code, 141, err)  # 128 + SIGPIPE, as a shell reports it
                self.assertTrue(first[0].startswith(b'0.'), first)  # the first line: the parameter count
                it = torch.load(f'{out}/last.pt', weights_only=True)['iter_num']
                self.assertLess(it, 1000)  # stopped at once, not at the end
                self.assertEqual(err, f"stopped by its output closing at iter {it}; saved last.pt. Resume with: "
                                      f"python gpt.py --init_from=resume --out_dir={out}\n")
                code, _, err = cli('gpt.py', self.train_args(out=out, max_iters=it + 2) + ['--init_from=resume'])
                self.assertEqual((code, err), (0, ''))

    def test_ctrl_c_under_tee_saves_last_pt_before_anything_is_printed(self):
        """`python gpt.py | tee log`, then Ctrl-C: the signal reaches both, tee dies, and the next print fails."""
        for unbuffered in (True, False):
            with self.subTest(unbuffered=unbuffered):
                read_fd, stream = stdout_over_a_pipe(unbuffered)
                real_step = gpt.train_step

                def step(model, optimizer, scaler, it):
                    if it == 3:
                        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the terminal...
                        os.close(read_fd)  # ...and tee dies with it
                    return real_step(model, optimizer, scaler, it)
                out = os.path.join(self.dir, f'tee{unbuffered}')
                with mock.patch.object(gpt, 'train_step', step):
                    code, err = self.run_with_stdout(stream, 'gpt.py', self.train_args(
                        out=out, max_iters=100, lr_decay_iters=100, log_interval=1))
                with contextlib.suppress(OSError):
                    stream.close()
                self.assertEqual(code, 130, err)
                self.assertEqual(torch.load(f'{out}/last.pt', weights_only=True)['iter_num'], 4)
                self.assertEqual(err, f"stopped by SIGINT at iter 4; saved last.pt. Resume with: python gpt.py "
                                      f"--init_from=resume --out_dir={out}\n")  # stdout is gone: on stderr
                self.assertEqual(max(int(r['iter']) for r in csv_rows(f'{out}/log.csv')), 4)

    @unittest.skipUnless(os.path.exists('/dev/full'), 'needs /dev/full, a device that is always full')
    def test_a_full_or_closed_stdout_fails_neither_training_nor_preparing(self):
        def full():  # block-buffered, as a stdout into a file
            stream = open('/dev/full', 'w', encoding='utf-8')
            self.addCleanup(stream.close)
            return stream
        for name, stdout in (('full', full), ('closed', lambda: None)):
            with self.subTest(stdout=name):
                out = os.path.join(self.dir, name)
                code, err = self.run_with_stdout(stdout(), 'gpt.py', self.train_args(out=out))
                self.assertEqual((code, err), (0, ''))
                self.assertEqual(torch.load(f'{out}/last.pt', weights_only=True)['iter_num'], 12)
                code, err = self.run_with_stdout(stdout(), 'prepare.py', [f'--input={self.input}',
                                                                         f'--data_dir={out}-data'])
                self.assertEqual((code, err), (0, ''))
                self.assertEqual(snapshot(f'{out}-data').keys(), {pathlib.Path(f'{out}-data', n) for n in
                                                                  ('train.bin', 'val.bin', 'meta.json')})
                code, err = self.run_with_stdout(stdout(), 'sample.py', [f'--out_dir={out}', '--device=cpu',
                                                                        '--start=Sing', '--max_new_tokens=5'],
                                                 lower=sample.LOWER)
                self.assertEqual(code, 2)  # the samples are what sample.py makes: it says they were lost
                self.assertRegex(err, r'^error: cannot write the samples to standard output \(.+\)\n$')

    def test_a_terminal_that_cannot_encode_the_text_shows_a_replacement_character(self):
        """PYTHONIOENCODING=ascii (or a C locale) while a BPE model prints characters beyond ASCII."""
        data = os.path.join(self.dir, 'bpe')
        pathlib.Path(self.input).write_text(TEXT.replace('the', 'thé'), encoding='utf-8')
        quiet(prepare.prepare, self.input, data, 'bpe', 300)
        ascii_out = io.BytesIO()
        stream = io.TextIOWrapper(ascii_out, encoding='ascii', errors='strict', write_through=True)
        code, err = self.run_with_stdout(stream, 'gpt.py', self.train_args(data_dir=data, max_iters=2,
                                                                          lr_decay_iters=2))
        self.assertEqual((code, err), (0, ''))
        code, err = self.run_with_stdout(stream, 'sample.py', [f'--out_dir={self.dir}/out', '--start=Sing thé',
                                                                '--device=cpu', '--max_new_tokens=5'],
                                         lower=sample.LOWER)
        self.assertEqual((code, err), (0, ''))
        printed = ascii_out.getvalue().decode('ascii')
        self.assertIn('iter 2: train loss', printed)
        self.assertIn('Sing th?', printed)  # the prompt, streamed back: é is not ASCII


class TestWhatAResumeKeeps(DataDirTest):
    """A resumed run keeps what it was trained with, wherever it is started from."""

    def test_a_resumed_run_keeps_its_dtype_and_the_machine_decides_device_and_compile(self):
        code, out, err = cli('gpt.py', self.train_args(max_iters=2, lr_decay_iters=2, dtype='bfloat16'))
        self.assertEqual(code, 0, err)
        code, out, err = cli('gpt.py', self.train_args(max_iters=4, lr_decay_iters=4) + ['--init_from=resume'])
        self.assertEqual(code, 0, err)
        self.assertIn('on cpu in bfloat16, its own settings', out)  # the checkpoint's dtype, not auto's float32
        last = torch.load(f'{self.dir}/out/last.pt', weights_only=True)
        self.assertEqual((last['config']['dtype'], last['config']['compile']), ('bfloat16', False))
        torch.save({**last, 'config': {**last['config'], 'dtype': 'float16'}}, f'{self.dir}/out/last.pt')
        code, _, err = cli('gpt.py', self.train_args(max_iters=6, lr_decay_iters=6) + ['--init_from=resume'])
        self.assertEqual((code, err), (2, "error: float16 (--dtype, or a resumed run's) needs a CUDA GPU; use "
                                          "--dtype=float32 or auto\n"))  # a run from a GPU, resumed here
        code, out, err = cli('gpt.py', self.train_args(max_iters=6, lr_decay_iters=6, dtype='auto') +
                             ['--init_from=resume'])
        self.assertEqual(code, 0, err)
        self.assertIn('on cpu in float32, its own settings', out)

    def test_a_resume_from_another_folder_finds_the_runs_data_and_its_hint_quotes_the_folder(self):
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        args = [a for a in self.train_args(max_iters=100, lr_decay_iters=100) if not a.startswith('--out_dir')]
        real_step = gpt.train_step

        def stop_at_3(model, optimizer, scaler, it):
            if it == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(model, optimizer, scaler, it)
        with mock.patch.object(gpt, 'train_step', stop_at_3):
            code, out, err = cli('gpt.py', [*args, '--data_dir=data', '--out_dir=my run'])  # relative, a space
        self.assertEqual(code, 128 + signal.SIGTERM, err)
        self.assertIn("Resume with: python gpt.py --init_from=resume --out_dir='my run'", out)
        os.makedirs('elsewhere')
        os.chdir('elsewhere')  # where no 'data' folder is
        code, out, err = cli('gpt.py', ['--init_from=resume', f'--out_dir={self.dir}/my run', '--device=cpu',
                                        '--max_iters=6'])
        self.assertEqual(code, 0, err)
        self.assertIn('resuming at iter 4', out)
        self.assertFalse(os.path.exists('data'))  # it ran no prepare.py here: it found the run's data


class TestCrossPlatformAndMemory(DataDirTest):

    def test_the_scripts_import_and_run_without_posix_only_modules_as_on_windows(self):
        """The four scripts imported afresh, and a tiny prepare -> train -> sample -> plot run by them, while
        fcntl and resource cannot be imported and os.sysconf is gone (torch and numpy were imported before:
        on Windows they need none of these either)."""
        sysconf, out = os.sysconf, os.path.join(self.dir, 'win')
        del os.sysconf
        self.addCleanup(setattr, os, 'sysconf', sysconf)
        with mock.patch.dict(sys.modules, {'fcntl': None, 'resource': None}):  # `import fcntl` fails
            for name in ('gpt', 'prepare', 'sample', 'bench'):
                del sys.modules[name]  # mock.patch.dict puts the ones imported before back afterwards
            fresh = {name: __import__(name) for name in ('gpt', 'prepare', 'sample', 'bench')}
            printed = output_of(lambda: (
                fresh['prepare'].prepare(self.input, f'{out}-data'),
                fresh['gpt'].main(training_args(self.dir, out, data_dir=f'{out}-data', max_iters=2,
                                                lr_decay_iters=2, eval_interval=2)),
                fresh['sample'].main([f'--out_dir={out}', '--device=cpu', '--start=Sing', '--max_new_tokens=5']),
                fresh['bench'].main(['plot', f'--out_dir={out}'])))
        self.assertIsNot(fresh['gpt'], gpt)  # run by the fresh modules
        self.assertIn('iter 2: train loss', printed)
        self.assertIn('\nSing', printed)
        self.assertIn(f'wrote {out}/loss.svg', printed)

    def test_running_out_of_memory_ends_in_one_line_naming_what_to_lower(self):
        for error in (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB'),
                      MemoryError('Unable to allocate 64.0 TiB for an array'),
                      RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")):
            with self.subTest(error=type(error).__name__), mock.patch.object(gpt, 'train_step', side_effect=error):
                code, _, err = cli('gpt.py', self.train_args(out=type(error).__name__))
                self.assertEqual((code, err), (2, 'error: out of memory; lower --batch_size or --block_size, or the '
                                                  'model (--n_layer, --n_embd)\n'))
        with mock.patch.object(gpt, 'train_step', side_effect=RuntimeError('some other failure')), \
                self.assertRaisesRegex(RuntimeError, 'some other failure'):  # not memory: a real traceback
            cli('gpt.py', self.train_args(out='other'))

    def test_when_process_0_cannot_make_out_dir_every_process_ends_in_one_line(self):
        """torchrun --out_dir=A_FILE: process 0 alone makes the folder; the others hear of its failure from
        the agreement, instead of going on to wait for it in their next collective operation."""
        model, optimizer, scaler = quiet(gpt.build, self.meta['vocab_size'])
        for rank, printed in ((0, f'error: cannot write to {self.input}/ (a file or a link has that name)\n'), (1, '')):
            with self.subTest(rank=rank), mock.patch.multiple(gpt, rank=rank, world_size=2, out_dir=self.input), \
                    mock.patch.object(gpt, 'agree', side_effect=lambda value, op=None: float(value) + (rank == 1)):
                err = io.StringIO()  # process 1 adds the failure that process 0 met: 1 in all
                with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as stop:
                    quiet(gpt.run_cli, lambda argv: gpt.Run(model, optimizer, scaler, self.meta, None), [])
                self.assertEqual((stop.exception.code, err.getvalue()), (2, printed))  # process 0 speaks for all

    def test_only_process_0_serializes_and_writes_the_checkpoint(self):
        quiet(gpt.main, self.train_args(max_iters=2, lr_decay_iters=2))
        saved = []
        with mock.patch.object(gpt.torch, 'save', side_effect=lambda *a, **k: saved.append(a)), \
                mock.patch.object(gpt, 'agree', side_effect=lambda value, op=None: float(value)):
            model, optimizer, scaler = gpt.build(self.meta['vocab_size'])
            for rank in (1, 0):
                with mock.patch.object(gpt, 'rank', rank):
                    run = quiet(gpt.Run, model, optimizer, scaler, self.meta, {'iter_num': 2, 'best_val_loss': 1.0})
                    quiet(run.save, 3, ['last.pt'])
                self.assertEqual(len(saved), rank == 0)  # process 1 serialized nothing

    def test_log_csv_gives_each_row_the_learning_rate_of_the_step_it_names(self):
        quiet(gpt.main, self.train_args(log_interval=3, eval_interval=5))
        rows = list(csv_rows(os.path.join(self.dir, 'out', 'log.csv')))
        self.assertEqual({r['val_loss'] == '' for r in rows}, {True, False})  # step rows and eval rows
        with mock.patch.multiple(gpt, learning_rate=gpt.DEFAULTS['learning_rate'], min_lr=gpt.DEFAULTS['min_lr'],
                                 warmup_iters=2, lr_decay_iters=12):
            for r in rows:
                self.assertEqual(r['lr'], f"{gpt.get_lr(int(r['iter'])):.4g}", r)


# -- Properties the suite left loosely pinned: decoding, the training loop's numbers, prepare.py, the block --------
class ScriptedGPT(gpt.GPT):
    """A GPT whose next-token logits a function of the text decides: script(row) -> (V,) logits for a row of token
    ids (the whole window it is given), the same at every position. Its config is a real one (block_size)."""

    def __init__(self, script, vocab_size, block_size=8):
        super().__init__(gpt.GPTConfig(vocab_size, block_size, 1, 1, 4))
        self.script = script
        self.eval()

    def forward(self, idx, targets=None, cache=None):
        last = torch.stack([torch.as_tensor(self.script(row.tolist()), dtype=torch.float32) for row in idx])
        return last[:, None, :].expand(idx.shape[0], idx.shape[1], last.shape[-1]), None


class TestDecodingTheNextToken(unittest.TestCase):
    """gpt.GPT.generate and sample.py's beam search and context window."""

    def test_top_k_generation_only_ever_picks_one_of_the_k_likeliest_tokens_of_its_own_row(self):
        # catches: `logits <= kth` (k - 1 kept), kth from row 0 or values[:, [0]], top_k ignored, an off-by-one k
        table = torch.tensor([[2.0, 5.0, 0.0, 4.0, 1.0, 3.0],  # a prompt of token 0: the top 3 are 1, 3, 5
                              [5.0, 0.0, 4.5, 1.0, 4.0, 3.5]])  # a prompt of token 1: the top 3 are 0, 2, 4
        model = ScriptedGPT(lambda row: table[row[0]], vocab_size=6)
        idx = torch.tensor([[0], [1]]).repeat(40, 1)  # (80, 1)
        torch.manual_seed(0)
        out = model.generate(idx, 6, temperature=20.0, top_k=3)  # hot: unfiltered, all 6 tokens would be drawn
        self.assertEqual(out.shape, (80, 7))
        self.assertEqual(set(out[0::2, 1:].flatten().tolist()), {1, 3, 5})  # each of the k, and no other
        self.assertEqual(set(out[1::2, 1:].flatten().tolist()), {0, 2, 4})
        out = model.generate(idx, 6, temperature=20.0, top_k=100)  # k above the vocabulary: every token
        self.assertEqual(set(out[:, 1:].flatten().tolist()), set(range(6)))

    def test_past_block_size_the_next_token_depends_only_on_the_last_block_size_tokens(self):
        # catches: no crop, a crop to the first block_size tokens, to block_size - 1 or block_size + 1 tokens
        def next_of(window):  # a token that every token of the window, its place and the window's length decide
            return sum((i + 1) * w for i, w in enumerate(window)) * 7 % 11
        model = ScriptedGPT(lambda row: torch.eye(11)[next_of(row)] * 10, vocab_size=11, block_size=8)
        torch.manual_seed(1)
        prompts = torch.randint(11, (1, 13)).repeat(2, 1)
        prompts[1, :5] = (prompts[0, :5] + 1) % 11  # (2, 13): only the 5 tokens before the last 8 differ
        out = model.generate(prompts, 12, temperature=0)
        self.assertEqual(out.shape, (2, 25))
        self.assertTrue(torch.equal(out[0, 13:], out[1, 13:]))  # what came before the window does not matter
        for t in range(13, 25):
            self.assertEqual(out[:, t].tolist(), [next_of(row) for row in out[:, t - 8:t].tolist()])
        for wrong in (lambda t: out[0, t - 7:t], lambda t: out[0, t - 9:t], lambda t: out[0, :8]):
            self.assertTrue(any(out[0, t].item() != next_of(wrong(t).tolist()) for t in range(13, 25)))  # it shows

    def test_the_length_penalty_ranks_finished_beams_by_logprob_over_length_to_the_penalty(self):
        # catches: a length counting the prompt, step ** -penalty, step + 1, dividing only unfinished beams,
        # ranking by the raw log-probability (the penalty ignored)
        START, END, A = 0, 1, 2  # and token 3, never likely
        script = {(): [0.0, 0.5, 0.4, 0.1],  # the short text 'END' (1 token), or 'A ...'
                  (A,): [0.0, 0.06, 0.9, 0.04],
                  (A, A): [0.0, 0.9, 0.05, 0.05]}  # the long text 'A A END' (3 tokens)

        def log_probs(row):
            return torch.tensor(script.get(tuple(row[1:]), [0.25] * 4)).clamp_min(1e-12).log()
        model = ScriptedGPT(log_probs, vocab_size=4)
        short_logprob, long_logprob = math.log(0.5), math.log(0.4) + math.log(0.9) + math.log(0.9)
        crossing = math.log(long_logprob / short_logprob) / math.log(3)  # long / 3**p == short / 1**p: p = 0.44
        for penalty in (0.0, crossing - 0.02, crossing + 0.02, 1.0, 3.0):
            out = sample.beam_search(model, torch.tensor([[START]]), 3, beams=2, length_penalty=penalty,
                                     stopped=lambda ids: ids[:, -1] == END, use_cache=False)
            long_wins = long_logprob / 3 ** penalty > short_logprob / 1 ** penalty
            with self.subTest(penalty=penalty):
                self.assertEqual(out.tolist(), [[START, A, A, END]] if long_wins else [[START, END]])
                self.assertEqual(long_wins, penalty > crossing)  # 0 prefers the shorter text, a large one the longer

    def test_the_context_window_starts_at_0_then_jumps_by_half_a_block_and_holds_half_to_a_whole_block(self):
        # catches: floor instead of ceil (more than block_size tokens), a hop of a whole block (1 token left),
        # hop = block_size // 2 without max(1, ...) (block_size 1 divides by 0), a first jump at T = block_size + 2
        for block_size in (1, 2, 7, 8):
            hop = max(1, block_size // 2)
            starts = [sample.window_start(T, block_size) for T in range(1, 3 * block_size + 1)]
            with self.subTest(block_size=block_size):
                self.assertEqual(starts[:block_size], [0] * block_size)  # T <= block_size: the whole text
                self.assertEqual(starts[block_size], hop)  # T = block_size + 1: the first jump, by half a block
                for T, start in enumerate(starts, 1):
                    self.assertEqual(start % hop, 0)
                    self.assertLessEqual(T - start, block_size)
                    self.assertGreaterEqual(T - start, min(T, block_size - hop + 1))  # at least half a block
                self.assertTrue(all(b - a in (0, hop) for a, b in zip(starts, starts[1:])))  # it moves in hops


class TestTheTrainingLoopsNumbers(DataDirTest):
    """The eval windows, the learning-rate schedule, the batches of each process, a loss of inf."""

    def recorded_starts(self, block_size=16, **settings):  # -> the model, estimate_loss's result, its get_batch calls
        starts, real_get_batch = [], gpt.get_batch

        def get_batch(split, starts_=None):
            starts.append((split, list(starts_)))
            return real_get_batch(split, starts_)
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=block_size)
        with mock.patch.multiple(gpt, data_dir=self.data_dir, block_size=block_size, device='cpu', dtype='float32',
                                 get_batch=get_batch, **settings):
            losses = gpt.estimate_loss(model, self.meta)
        return model, losses, starts

    def test_the_eval_windows_are_spread_evenly_over_each_split_at_whole_block_starts(self):
        # catches: starts without `* block_size`, the first k windows only, i * k // n, n = N // T (a last window
        # one token short of its target, when T divides N)
        T = next(t for t in (8, 16, 4, 2, 1) if self.meta['val_tokens'] % t == 0)  # N = n * T + T: the edge case
        _, _, calls = self.recorded_starts(T, batch_size=5, eval_iters=1)
        for split in ('train', 'val'):
            N = self.meta[f'{split}_tokens']
            n = (N - 1) // T
            k = min(n, 5)
            starts = [s for name, batch in calls if name == split for s in batch]
            self.assertEqual(starts, [i * n // k * T for i in range(k)])
            self.assertGreater(starts[-1], (n - 1) * T * 0.7)  # the last window near the end of the split ...
            self.assertLessEqual(starts[-1] + T + 1, N)  # ... and wholly inside it (inputs and targets)
        _, _, calls = self.recorded_starts(T, batch_size=5, eval_iters=1000)  # more asked than there are: all, once
        n = (self.meta['val_tokens'] - 1) // T
        self.assertEqual([s for name, batch in calls if name == 'val' for s in batch], [i * T for i in range(n)])

    def test_the_eval_loss_is_the_plain_mean_over_windows_even_with_a_short_last_batch(self):
        # catches: `* batch_size` instead of `* len(x)`, the mean of batch means, / number of batches
        n = (self.meta['val_tokens'] - 1) // 16
        batch_size = next(b for b in (4, 5, 6, 7) if n % b not in (0, 1))  # a last batch of 2 or more, short
        model, losses, calls = self.recorded_starts(batch_size=batch_size, eval_iters=1000)
        sizes = [len(batch) for name, batch in calls if name == 'val']
        self.assertLess(sizes[-1], batch_size)  # the case at hand: k is not a multiple of batch_size
        with mock.patch.multiple(gpt, data_dir=self.data_dir, block_size=16, device='cpu', dtype='float32'):
            per_window = [model(*gpt.get_batch('val', [i * 16]))[1].item() for i in range(n)]
        self.assertAlmostEqual(losses['val'], sum(per_window) / n, places=5)
        batch_means = [np.mean(per_window[i:i + batch_size]) for i in range(0, n, batch_size)]
        self.assertGreater(abs(np.mean(batch_means) - losses['val']), 1e-4)  # the weighting is what is tested

    def test_the_lr_warms_up_linearly_then_follows_half_a_cosine_from_the_peak_to_min_lr(self):
        # catches: progress from `it` not `it - warmup`, cos(pi * p / 2), a linear decay, warmup it / warmup,
        # `* learning_rate` instead of `* (learning_rate - min_lr)`, min_lr too early or too late
        with mock.patch.multiple(gpt, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110):
            lr = {it: gpt.get_lr(it) for it in range(0, 130)}
        for it in range(10):
            self.assertAlmostEqual(lr[it], (it + 1) / 11, places=12)  # linear, step 0 above zero
        self.assertAlmostEqual(lr[10], 1.0, places=12)  # the peak, at the end of warmup
        self.assertAlmostEqual(lr[60], (1.0 + 0.1) / 2, places=12)  # half way through the decay: half way down
        self.assertAlmostEqual(lr[35], 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, places=12)  # a quarter
        self.assertAlmostEqual(lr[85], 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2, places=12)  # three quarters
        for d in range(1, 50):  # a cosine: symmetric about the midpoint
            self.assertAlmostEqual(lr[60 - d] - 0.55, 0.55 - lr[60 + d], places=12)
        self.assertTrue(all(lr[it] > lr[it + 1] for it in range(10, 110)))  # falling at every step of the decay
        self.assertTrue(all(lr[it] == 0.1 for it in range(110, 130)))

    def test_under_torchrun_each_process_trains_on_its_own_batches_and_a_rank_repeats_its_own(self):
        # catches: the step's seed from (seed, it) alone, without the rank
        drawn, real_get_batch = [], gpt.get_batch

        def get_batch(split, starts=None):
            x, y = real_get_batch(split, starts)
            drawn.append(x)
            return x, y
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        settings = dict(data_dir=self.data_dir, batch_size=4, block_size=16, device='cpu', dtype='float32', seed=1337,
                        grad_clip=1.0, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_iters=0,
                        get_batch=get_batch)
        ranks = (0, 1, 2, 3, 0, 1)
        for rank in ranks:
            torch.rand(rank + 3)  # whatever ran before in the process: the step's own seed decides
            with mock.patch.multiple(gpt, rank=rank, **settings):
                gpt.train_step(model, optimizer, torch.amp.GradScaler(enabled=False), 5)  # the same step
        self.assertEqual(len(drawn), len(ranks))
        for a in range(4):
            for b in range(a + 1, 4):
                self.assertFalse(torch.equal(drawn[a], drawn[b]), (a, b))  # ranks a and b: other rows
        self.assertTrue(torch.equal(drawn[0], drawn[4]))  # rank 0 again: its rows again
        self.assertTrue(torch.equal(drawn[1], drawn[5]))

class TestWhatBPEMergesAndWherePrepareWrites(DataDirTest):
    """prepare.train_bpe's rule for which pair merges, and the order in which prepare() puts its files in place."""

    def test_a_pair_seen_only_once_is_never_merged_so_learning_stops_early(self):
        # catches: queueing pairs of count 1 (at the start, made by a merge, or re-queued after their count fell)
        merges, ids = quiet(prepare.train_bpe, byte_ids('ababcd'), 1000)  # ab twice; ba, bc, cd once
        self.assertEqual(merges, [(97, 98)])  # then (N, N), (N, c), (c, d): once each, and no more merges
        self.assertEqual(ids.tolist(), [256, 256, 99, 100])
        merges, ids = quiet(prepare.train_bpe, byte_ids('ababba'), 1000)  # ab, ba twice: ab first (smaller) ...
        self.assertEqual((merges, ids.tolist()), ([(97, 98)], [256, 256, 98, 97]))  # ... and ba is left once
        merges, ids = quiet(prepare.train_bpe, byte_ids('abcdefg'), 1000)
        self.assertEqual((merges, ids.tolist()), ([], byte_ids('abcdefg').tolist()))

    def test_of_pairs_with_equal_counts_the_smallest_merges_first(self):
        # catches: the largest pair first, the first-seen pair first (Counter.most_common), a heap of +count
        for text, expected in (('zyzyabab', [(97, 98), (122, 121)]),  # zy and ab twice: ab is smaller
                               ('acacabab', [(97, 98), (97, 99)]),  # ac, ca, ab twice: ab, then ac
                               ('xyxyxyabab', [(120, 121), (97, 98), (256, 256)])):  # 3 beats a smaller pair's 2
            with self.subTest(text=text):
                self.assertEqual(quiet(prepare.train_bpe, byte_ids(text), 1000)[0], expected)

    def test_overlapping_pairs_count_and_merge_left_to_right(self):
        # catches: merging right to left ('aaa' -> a N), counting non-overlapping pairs ('aaa' would merge nothing)
        for text, expected in (('aaa', [256, 97]), ('aaaaa', [256, 256, 97]), ('aaab' * 3, [256, 97, 98] * 3)):
            with self.subTest(text=text):
                merges, ids = quiet(prepare.train_bpe, byte_ids(text), 257)  # one merge
                self.assertEqual(merges, [(97, 97)])
                self.assertEqual(ids.tolist(), expected)
                self.assertEqual(gpt.BPETokenizer(merges).encode(text), expected)  # as encode does

    def test_prepare_removes_meta_json_before_replacing_the_token_files_and_puts_it_back_last(self):
        # catches: meta.json replaced first or not removed first, so a crash mid-way leaves an old meta.json that
        # still describes (or happens to fit) the new token files
        pathlib.Path(self.input).write_text(TEXT[:-700], encoding='utf-8')  # new data: other sizes
        events = []
        real_replace, real_remove = os.replace, os.remove

        def replace(src, dst):
            events.append(('replace', os.path.basename(dst)))
            return real_replace(src, dst)

        def remove(path):
            events.append(('remove', os.path.basename(path)))
            return real_remove(path)
        with mock.patch.object(prepare.os, 'replace', replace), mock.patch.object(prepare.os, 'remove', remove):
            quiet(prepare.prepare, self.input, self.data_dir)
        self.assertEqual(events[0], ('remove', 'meta.json'))
        self.assertEqual([name for what, name in events if what == 'replace'][-1], 'meta.json')
        self.assertEqual(sorted(events[1:]), [('replace', n) for n in ('meta.json', 'train.bin', 'val.bin')])

    def test_a_crash_while_prepare_replaces_its_files_leaves_a_folder_without_meta_json(self):
        # catches: the same as above, seen from the folder: a crash at any replace keeps no meta.json
        pathlib.Path(self.input).write_text(TEXT[:-700], encoding='utf-8')
        real_replace = os.replace

        class Crash(BaseException):
            pass
        for crash_at in ('train.bin', 'val.bin', 'meta.json'):
            quiet(prepare.prepare, self.input, os.path.join(self.dir, 'fresh'))  # a whole folder, then a crash
            data_dir = os.path.join(self.dir, 'fresh')

            def replace(src, dst):
                if os.path.basename(dst) == crash_at:
                    raise Crash
                return real_replace(src, dst)
            pathlib.Path(self.input).write_text(TEXT, encoding='utf-8')  # other data than the folder holds
            with self.subTest(crash_at=crash_at), mock.patch.object(prepare.os, 'replace', replace), \
                    self.assertRaises(Crash):
                quiet(prepare.prepare, self.input, data_dir)
            self.assertFalse(os.path.exists(os.path.join(data_dir, 'meta.json')))
            with mock.patch.multiple(gpt, data_dir=data_dir, block_size=8, world_size=1), \
                    self.assertRaisesRegex(gpt.UserError, 'no whole prepare.py output'):
                gpt.read_data()
            pathlib.Path(self.input).write_text(TEXT[:-700], encoding='utf-8')


class TestPositionAndNormalization(unittest.TestCase):
    """The position embedding breaks attention's indifference to order; each sub-block reads a LayerNorm of x."""

    def test_a_bigram_model_gives_one_token_other_logits_at_other_positions_through_pos_emb_alone(self):
        # catches: forward without pos_emb, positions all 0, pos_emb indexed by the token ids
        model = tiny_model(n_layer=0, seed=1)
        idx = torch.full((1, 8), 3)  # the same token at every position
        with torch.no_grad():
            logits = model(idx)[0][0]
            for t in range(1, 8):
                self.assertFalse(torch.allclose(logits[0], logits[t], atol=1e-4), t)
            model.pos_emb.weight.zero_()
            logits = model(idx)[0][0]
        for t in range(1, 8):
            self.assertTrue(torch.allclose(logits[0], logits[t], atol=1e-6), t)  # without it, one answer

    def test_permuting_the_context_changes_the_last_logits_and_without_pos_emb_one_block_sees_a_set(self):
        # catches: forward without pos_emb or with positions all 0 (one block then sees the context as a set)
        idx = torch.tensor([[4, 1, 7, 2, 9, 0, 5, 3]])
        permuted = idx[:, [6, 3, 0, 5, 1, 4, 2, 7]]  # the same tokens before the last one, in another order
        for n_layer in (1, 3):
            model = nudged(tiny_model(n_layer=n_layer, block_size=8, seed=2), scale=0.2)
            with self.subTest(n_layer=n_layer), torch.no_grad():
                a, b = model(idx)[0][0, -1], model(permuted)[0][0, -1]
                self.assertGreater((a - b).abs().max().item(), 1e-3)  # the order of the context matters
        with torch.no_grad():  # deeper, the earlier tokens' own causal contexts still differ
            model.pos_emb.weight.zero_()
            self.assertGreater((model(idx)[0][0, -1] - model(permuted)[0][0, -1]).abs().max().item(), 1e-3)
        model = nudged(tiny_model(n_layer=1, block_size=8, seed=2), scale=0.2)
        with torch.no_grad():
            model.pos_emb.weight.zero_()
            a, b = model(idx)[0][0, -1], model(permuted)[0][0, -1]
        self.assertTrue(torch.allclose(a, b, atol=1e-5))  # one block, no positions: the last token sees a set

    def test_a_block_adds_attention_of_ln1_x_then_the_feed_forward_of_ln2_of_that_sum(self):
        # catches: ffwd(ln1(x)), ffwd(x) (no ln2), ffwd(ln2 of the block's input, before attention), post-norm
        block = nudged(tiny_model(n_embd=16, seed=3), scale=0.3).blocks[0]
        with torch.no_grad():
            block.ln2.weight.uniform_(0.5, 2.0)  # ln2 no identity, and unlike ln1
            block.ln2.bias.normal_(0, 0.5)
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            h = x + block.attn(block.ln1(x))
            out = block(x)
            self.assertTrue(torch.allclose(out, h + block.ffwd(block.ln2(h)), atol=1e-6))
            for wrong in (h + block.ffwd(block.ln1(h)), h + block.ffwd(h), h + block.ffwd(block.ln2(x)),
                          block.ln2(h + block.ffwd(h))):
                self.assertFalse(torch.allclose(out, wrong, atol=1e-3))  # each of those bugs would show

    def test_the_feed_forward_reads_a_normalized_stream_however_large_the_block_input(self):
        # catches: ffwd(x) or ffwd(ln1(x)) in place of ffwd(ln2(x)): unnormalized, or normalized with ln1's gains
        block = nudged(tiny_model(n_embd=16, seed=4), scale=0.3).blocks[0]
        with torch.no_grad():
            block.ln2.weight.uniform_(0.5, 2.0)
            block.ln2.bias.normal_(0, 0.5)
        seen = []
        block.ffwd.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
        for scale in (1.0, 100.0, 1e4):
            with torch.no_grad():
                block(x * scale)
            z = (seen[-1] - block.ln2.bias) / block.ln2.weight  # undo ln2's gain and shift
            with self.subTest(scale=scale):
                self.assertLess(z.mean(-1).abs().max().item(), 1e-4)  # each token: mean 0 ...
                self.assertLess((z.var(-1, unbiased=False) - 1).abs().max().item(), 1e-3)  # ... variance 1


class TestTeardown(DataDirTest):
    """Real bugs found while hunting the DDP flake: each test fails on the code as it is."""

    def test_a_finished_ddp_run_tears_its_process_group_down_before_exit(self):
        """DDP sits in a reference cycle: after train() returns it lives on, and with it the gloo process group
        its reducer holds, past destroy_process_group, until the interpreter exits; tearing gloo down there
        aborts the process (SIGABRT, 'terminate called without an active exception') when another process is
        still connected: the DDP test's flake, and a torchrun run that can end in a crash after it finished."""
        dist.init_process_group('gloo', init_method=f"file://{os.path.join(self.dir, 'rendezvous')}", rank=0,
                                world_size=1)  # a real group of one, which main() takes for torchrun's
        self.addCleanup(lambda: dist.is_initialized() and dist.destroy_process_group())
        alive, real_destroy = [], dist.destroy_process_group

        def destroy(*args, **kwargs):  # what is left of DDP when main() tears the group down
            alive.append(sum(isinstance(o, DDP) for o in gc.get_objects()))
            return real_destroy(*args, **kwargs)
        gc.collect()
        gc.disable()  # no collection by chance: what main() itself does decides
        self.addCleanup(gc.enable)
        with mock.patch.dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='2'), \
                mock.patch.multiple(gpt, rank=0, world_size=1), \
                mock.patch.object(dist, 'init_process_group', lambda *a, **k: None), \
                mock.patch.object(dist, 'destroy_process_group', destroy):
            quiet(gpt.main, self.train_args(max_iters=2, lr_decay_iters=2, eval_interval=2))
        self.assertEqual(alive, [0])


@unittest.skipUnless(torch.cuda.is_available(), 'needs a CUDA GPU (bench.py gpu runs these on one)')
class TestCUDA(DataDirTest):

    def test_fused_attention_equals_the_written_out_head_math_in_bfloat16(self):
        idx = torch.randint(11, (4, 8), device='cuda')
        with torch.autocast('cuda', torch.bfloat16):
            fused, explicit = (tiny_model(flash=f).cuda()(idx)[0].float() for f in (True, False))
        self.assertLess((fused - explicit).abs().max().item(), 2e-2)  # bfloat16 keeps about 3 significant digits

    def test_kv_cache_matches_full_recompute(self):
        model = tiny_model(block_size=16).cuda()
        idx = torch.randint(11, (3, 4), device='cuda')
        cache = sample.KVCache(model.config)
        for _ in range(30):  # past block_size: the window moves and the cache is refilled
            cached, full = sample.next_logits(model, idx, cache), sample.next_logits(model, idx)
            self.assertLess((cached - full).abs().max().item(), 1e-4)
            idx = torch.cat((idx, cached.argmax(-1, keepdim=True)), dim=1)

    def test_compiled_and_eager_training_give_close_losses(self):
        logs = [output_of(gpt.main, self.train_args(out=f'c{c}', device='cuda', dtype='float32', compile=c))
                for c in (True, False)]
        a, b = ([float(x) for x in re.findall(r"iter \d+/\d+: loss (\S+),", log)] for log in logs)
        self.assertEqual(len(a), 12)
        self.assertTrue(all(abs(x - y) < 1e-2 for x, y in zip(a, b)), (a, b))

    def test_a_checkpoint_saved_on_cuda_loads_on_the_cpu_and_samples(self):
        quiet(gpt.main, self.train_args(device='cuda', max_iters=4, lr_decay_iters=4))
        torch.load(os.path.join(self.dir, 'out', 'ckpt.pt'), weights_only=True, map_location='cpu')
        out = output_of(sample.main, [f'--out_dir={self.dir}/out', '--start=Sing', '--num_samples=1',
                                      '--max_new_tokens=20', '--device=cpu'])
        self.assertTrue(out.startswith('Sing') and len(out) > 20, out)

    def test_float16_trains_with_the_loss_scaler_and_no_nan(self):
        log = output_of(gpt.main, self.train_args(device='cuda', dtype='float16'))
        losses = [float(x) for x in re.findall(r"iter \d+/\d+: loss (\S+),", log)]
        self.assertEqual(len(losses), 12)
        self.assertTrue(all(math.isfinite(x) for x in losses))
        self.assertLess(losses[-1], losses[0])
        self.assertIn('scale', torch.load(os.path.join(self.dir, 'out', 'last.pt'), weights_only=True)['scaler'])

    def test_the_cuda_graph_step_gives_the_text_of_recompute_past_block_size_and_under_beam_search(self):
        model = tiny_model(block_size=8).cuda()
        idx = torch.randint(11, (2, 3), device='cuda')
        cache = sample.KVCache(model.config)
        for _ in range(3):
            idx = torch.cat((idx, sample.next_logits(model, idx, cache).argmax(-1, keepdim=True)), dim=1)
        self.assertIsNotNone(cache.graph)  # the one-token steps replay a captured graph
        texts = [sample.sample(model, idx, 40, temperature=0, use_cache=c) for c in (True, False)]
        self.assertTrue(torch.equal(*texts))
        beams = [sample.beam_search(model, idx[:1], 25, beams=4, use_cache=c) for c in (True, False)]
        self.assertTrue(torch.equal(*beams))


if __name__ == '__main__':
    unittest.main()
