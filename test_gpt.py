"""Tests: each states a property of a GPT or of its scripts, one class per topic in the order of gpt.py's
sections, then the other scripts. CPU, tiny models, no network, no input.txt: python -m unittest test_gpt"""
import contextlib, csv, errno, gc, importlib, io, json, math, multiprocessing, os, pathlib, re, runpy, signal, \
    subprocess, sys, tempfile, time, unittest  # noqa: E401
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
resource = importlib.import_module('resource') if os.name == 'posix' else None  # RLIMIT_FSIZE: POSIX only
FORK = multiprocessing.get_context('fork') if hasattr(os, 'fork') else None  # a child sharing our imports
TEXT = ''.join(f"{w} the {n} of {v}.\n" for w, n, v in zip(
    ['Sing', 'Tell', 'Speak', 'Weep', 'Laugh', 'Dream', 'Fight'] * 20,
    ['song', 'tale', 'truth', 'grief', 'joy', 'night', 'war', 'sea'] * 20,
    ['kings', 'queens', 'fools', 'gods', 'men', 'stars', 'ships', 'wolves', 'fields'] * 20))

def tiny_model(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, seed=0, flash=True):
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, flash)).eval()

def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)

def cli(script, args):
    """A script's command line in this process, as `python script args` runs it: (exit code, stdout, stderr)."""
    main = {'gpt.py': gpt.main, 'prepare.py': prepare.main, 'sample.py': sample.main_in_memory,
            'bench.py': bench.main}[script]
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in gpt.SIGNALS}  # a run takes the signals: give them back after
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            gpt.run_cli(main, args)
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):  # what Python prints for sys.exit('...')
                print(e.code, file=sys.stderr)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return code or 0, out.getvalue(), err.getvalue()

def forked(target, *args, timeout=120):
    """target(*args) in a forked copy of this process (it shares our imports: no 2 s torch import); its output
    goes to a file. -> (exit code, what it printed); a child still alive at the timeout is killed (code None)."""
    with tempfile.NamedTemporaryFile('r', suffix='.log') as log:
        def child():
            fd = os.open(log.name, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            target(*args)
        process = FORK.Process(target=child)
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            return None, log.read()
        return process.exitcode, log.read()

def snapshot(folder):
    """Every file under folder with its bytes, to prove that nothing was changed."""
    return {p: p.read_bytes() for p in pathlib.Path(folder).rglob('*') if p.is_file()}

def csv_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))

def training_args(folder, out='out', **overrides):
    """gpt.py's arguments for a quick run of a small model on folder/data, into folder/out."""
    args = dict(data_dir=os.path.join(folder, 'data'), out_dir=os.path.join(folder, out), batch_size=4, block_size=16,
                n_layer=2, n_head=2, n_embd=32, max_iters=12, lr_decay_iters=12, warmup_iters=2,
                eval_interval=6, eval_iters=2, log_interval=1, device='cpu')
    args.update(overrides)
    return [f'--{k}={v}' for k, v in args.items()]

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

    def use_data(self, **settings):
        """gpt's globals as setup leaves them for this folder's data (restored after the test); -> meta."""
        patcher = mock.patch.multiple(gpt, **{'data_dir': self.data_dir, 'device': 'cpu', 'dtype': 'float32',
                                              'block_size': 16, 'batch_size': 4, **settings})
        patcher.start()
        self.addCleanup(patcher.stop)
        tokens = mock.patch.dict(gpt.tokens)
        tokens.start()
        self.addCleanup(tokens.stop)
        return gpt.read_data()

def write_data(folder, train, val, tokenizer=None, chars=None):
    """A data folder as prepare.py leaves one, from token ids: train.bin, val.bin (uint16) and meta.json."""
    os.makedirs(folder, exist_ok=True)
    for split, ids in (('train', train), ('val', val)):
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))
    train_chars, val_chars = chars or (len(train), len(val))
    meta = {'tokenizer': tokenizer or {'kind': 'bpe', 'merges': []}, 'vocab_size': int(max(*train, *val)) + 1,
            'train_tokens': len(train), 'val_tokens': len(val), 'train_chars': train_chars, 'val_chars': val_chars}
    pathlib.Path(folder, 'meta.json').write_text(json.dumps(meta), encoding='utf-8')
    return folder

def written_out_forward(model, idx):
    """GPT.forward written from scratch with the model's weights: the logits (B, T, V)."""
    (B, T), C, nh = idx.shape, model.config.n_embd, model.config.n_head
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

class TestTokenizers(unittest.TestCase):
    """Text to ids and back: one id per character, or byte-level BPE's merges; BPE decodes any ids; a start text
    a char model cannot encode is one line naming the fix (sample.py), not CharTokenizer's KeyError."""
    # Merges by hand: 'th', 'the' (on merge 0), ' the', 'é' (its two bytes), 'é ' (across a character's edge)
    MERGES = [(116, 104), (256, 101), (32, 257), (195, 169), (259, 32)]
    TEXTS = [TEXT, 'Ünïcödé — 漢字, emoji 🙂, tabs\tand\r\nnewlines', ''.join(map(chr, range(900))),
             'é é\0thethe', '']
    PROMPTS = [(['--start=Sing Zé'], "characters not in the model's vocabulary: 'Zé'; remove them"),
               ([], "this model's vocabulary has no newline, the default start text; give one with --start=TEXT")]

    def test_a_char_tokenizer_round_trips_any_text_with_one_id_per_distinct_character(self):
        for text in self.TEXTS:
            tok = gpt.CharTokenizer(sorted(set(text)))
            ids = tok.encode(text)
            with self.subTest(text=text[:10]):
                self.assertEqual(tok.decode(ids), text)
                self.assertEqual((tok.vocab_size, sorted(set(ids))), (len(set(text)), list(range(len(set(text))))))

    def test_bpe_round_trips_any_unicode_text(self):
        tok = gpt.BPETokenizer(self.MERGES)
        for text in self.TEXTS:
            with self.subTest(text=text[:10]):
                self.assertEqual(tok.decode(tok.encode(text)), text)

    def test_bpe_merges_shorten_the_text_in_their_order_and_overlapping_pairs_merge_left_to_right(self):
        tok = gpt.BPETokenizer(self.MERGES)
        self.assertEqual(tok.encode(' the thé é'), [258, 32, 256, 260, 259])  # 13 bytes in 5 tokens
        self.assertLess(len(tok.encode(TEXT)), len(TEXT.encode('utf-8')) - 3 * TEXT.count(' the'))
        one_merge = gpt.BPETokenizer([(7, 7)])  # bytes 7, 7 -> id 256
        self.assertEqual(one_merge.encode('\x07\x07\x07\x01\x07\x07'), [256, 7, 1, 256])
        self.assertEqual(one_merge.encode('\x07\x07\x07\x07\x07\x02\x07'), [256, 256, 7, 2, 7])

    def test_bpe_decodes_any_ids_replacing_broken_utf8(self):
        tok = gpt.BPETokenizer(self.MERGES)

        def spelled(i):  # the bytes of an id, by undoing its merges
            return bytes([i]) if i < 256 else spelled(self.MERGES[i - 256][0]) + spelled(self.MERGES[i - 256][1])
        ids = torch.randint(tok.vocab_size, (500,), generator=torch.Generator().manual_seed(0)).tolist()
        self.assertEqual(tok.decode(ids), b''.join(map(spelled, ids)).decode('utf-8', errors='replace'))
        self.assertEqual(tok.decode([195, 169, 259, 195]), 'éé\ufffd')  # 'é' as bytes, as one id, then half of it
        self.assertEqual(tok.decode([169, 260]), '\ufffdé ')

    def test_load_tokenizer_picks_the_kind_that_meta_names(self):
        bpe = gpt.load_tokenizer(json.loads(json.dumps({'kind': 'bpe', 'merges': self.MERGES})))  # pairs as lists
        char = gpt.load_tokenizer({'kind': 'char', 'vocab': ['\n', ' ', 'a']})
        self.assertEqual((type(bpe), bpe.encode(' the'), bpe.vocab_size), (gpt.BPETokenizer, [258], 256 + 5))
        self.assertEqual((type(char), char.encode('a \n')), (gpt.CharTokenizer, [2, 1, 0]))

    def test_a_start_text_outside_a_char_vocabulary_is_a_one_line_error(self):
        tok = gpt.CharTokenizer(sorted(set(TEXT) - {'\n'}))
        model = tiny_model(vocab_size=tok.vocab_size)
        for args, message in self.PROMPTS:
            with self.subTest(args=args), mock.patch.object(sample, 'load_model', lambda path, device: (model, tok)):
                self.assertEqual(cli('sample.py', args + ['--device=cpu']), (2, '', f'error: {message}\n'))

class TestData(DataDirTest):
    """get_batch's rows of T + 1 tokens, drawn where they fit, from files read_data maps once; the smallest split."""
    T = 8

    def counting(self, train, val):  # a data folder whose token at position i is i: a row's first token is its start
        return write_data(os.path.join(self.dir, f'count_{train}_{val}'), np.arange(train), np.arange(val))

    def test_rows_are_the_t_plus_1_tokens_from_each_start_and_targets_are_inputs_shifted_by_one(self):
        self.use_data(data_dir=self.counting(100, 50), block_size=self.T)
        x, y = gpt.get_batch('val', [0, 7, 41])  # 41 + 8: the last token of the split
        starts = torch.tensor([[0], [7], [41]])
        self.assertEqual((x.dtype, x.shape, y.shape), (torch.int64, (3, self.T), (3, self.T)))
        self.assertTrue(torch.equal(x, starts + torch.arange(self.T)))
        self.assertTrue(torch.equal(y, starts + 1 + torch.arange(self.T)))

    def test_random_starts_are_every_start_whose_row_fits_and_no_other(self):
        self.use_data(data_dir=self.counting(self.T + 4, 50), block_size=self.T, batch_size=400)
        torch.manual_seed(0)
        x, y = gpt.get_batch('train')
        self.assertEqual(sorted(set(x[:, 0].tolist())), [0, 1, 2, 3])  # from 3, the row ends at the last token
        self.assertTrue(torch.equal(y, x + 1))

    def test_a_run_keeps_reading_the_data_it_began_with_when_prepare_replaces_the_files(self):
        # issue #32: get_batch reads the files read_data mapped; one that opened them at each call read the new data
        self.use_data()
        old = {s: np.fromfile(os.path.join(self.data_dir, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')}
        pathlib.Path(self.input).write_text(TEXT.upper()[::-1], encoding='utf-8')  # as long, other tokens
        quiet(prepare.prepare, self.input, self.data_dir)  # into the same folder, while the run goes on
        for split in ('train', 'val'):
            new = np.fromfile(os.path.join(self.data_dir, f'{split}.bin'), dtype=np.uint16)
            x, y = gpt.get_batch(split, [0, 300])
            rows = torch.cat((x, y[:, -1:]), 1).tolist()
            self.assertEqual(rows, [old[split][s:s + 17].tolist() for s in (0, 300)])
            self.assertNotEqual(rows, [new[s:s + 17].tolist() for s in (0, 300)])  # the files did change

    def test_a_split_of_block_size_plus_1_tokens_is_the_smallest_that_is_read_and_drawn_from(self):
        for split in ('train', 'val'):
            sizes = {'train': 50, 'val': 50, split: self.T + 1}
            with self.subTest(split=split):
                meta = self.use_data(data_dir=self.counting(sizes['train'], sizes['val']), block_size=self.T)
                x, y = gpt.get_batch(split)  # random starts: 0 is the only one whose row fits
                self.assertTrue(torch.equal(x, torch.arange(self.T).expand(4, -1)))
                self.assertTrue(torch.equal(y, x + 1))
                model = tiny_model(vocab_size=50, block_size=self.T)  # and the eval has its one window
                loss = gpt.estimate_loss(model, meta, [split])[split]
                self.assertAlmostEqual(loss, model(x[:1], y[:1])[1].item(), places=5)

    def test_a_split_of_block_size_tokens_is_refused_in_one_line_naming_block_size(self):
        for split in ('train', 'val'):
            sizes = {'train': 50, 'val': 50, split: self.T}
            folder, err = self.counting(sizes['train'], sizes['val']), io.StringIO()
            message = f"error: --block_size={self.T} is not shorter than the {split} split; lower it\n"
            with self.subTest(split=split):
                with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
                    gpt.run_cli(lambda argv: self.use_data(data_dir=folder, block_size=self.T), [])
                self.assertEqual((e.exception.code, err.getvalue()), (2, message))

class TestModel(unittest.TestCase):
    """The transformer: causal attention (two paths, one result), GPT-2's init, positions, pre-norm blocks."""

    def test_loss_at_init_is_about_ln_vocab_size(self):
        model = tiny_model(vocab_size=65, block_size=32)
        _, loss = model(torch.randint(65, (8, 32)), torch.randint(65, (8, 32)))
        self.assertAlmostEqual(loss.item(), math.log(65), delta=0.1)

    def test_logits_do_not_depend_on_future_tokens(self):
        for flash in (True, False):
            model = tiny_model(flash=flash)
            idx = torch.randint(11, (2, 8))
            changed = torch.cat((idx[:, :5], (idx[:, 5:] + 1) % 11), 1)  # other tokens from position 5 on
            a, b = model(idx)[0], model(changed)[0]
            with self.subTest(flash=flash):
                self.assertTrue(torch.allclose(a[:, :5], b[:, :5], atol=1e-6))
                self.assertFalse(torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3))

    def test_fused_attention_equals_the_written_out_head_math(self):
        flash, explicit = tiny_model(flash=True), tiny_model(flash=False)  # the same seed: the same weights
        idx = torch.randint(11, (3, 8))
        self.assertTrue(torch.allclose(flash(idx)[0], explicit(idx)[0], atol=1e-5))
        q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)  # (B, nh, T, hs) each
        self.assertTrue(torch.allclose(gpt.Head(0.0, flash=False)(q, k, v), gpt.Head(0.0)(q, k, v), atol=1e-6))

    def test_a_model_with_no_blocks_is_a_bigram_model(self):
        model = tiny_model(n_layer=0)
        idx = torch.randint(11, (2, 8))
        changed = torch.cat(((idx[:, :4] + 1) % 11, idx[:, 4:]), 1)  # only a token and its position matter
        self.assertTrue(torch.equal(model(idx)[0][:, 4:], model(changed)[0][:, 4:]))

    def test_lm_head_is_tied_to_token_embedding_and_residual_projections_are_scaled(self):
        model = tiny_model(n_layer=8, n_embd=64)
        self.assertIs(model.lm_head.weight, model.tok_emb.weight)
        for proj in (model.blocks[0].attn.proj, model.blocks[7].ffwd.proj):
            self.assertAlmostEqual(proj.weight.std().item(), 0.02 / math.sqrt(16), delta=0.002)
            self.assertEqual(proj.bias.abs().sum().item(), 0.0)
        self.assertAlmostEqual(model.blocks[0].attn.qkv.weight.std().item(), 0.02, delta=0.002)

    def test_a_tiny_model_overfits_a_short_text(self):
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
        self.assertLess(loss.item(), 0.5)  # from ln(vocab) = 3.4

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
        # hs 8, T 10 in the last: a scale by T or by C instead of sqrt(hs) would show
        for flash, shape, T in ((True, {}, 8), (False, {}, 8), (True, dict(n_embd=24, n_head=3, block_size=12), 10)):
            model = nudged(tiny_model(flash=flash, **shape))
            idx = torch.randint(11, (3, T))
            with self.subTest(flash=flash, **shape), torch.no_grad():
                self.assertLess((model(idx)[0] - written_out_forward(model, idx)).abs().max().item(), 1e-5)

    def test_a_bigram_model_gives_one_token_other_logits_at_other_positions_through_pos_emb_alone(self):
        # catches: forward without pos_emb, positions all 0, pos_emb indexed by the token ids
        model = tiny_model(n_layer=0, seed=1)
        idx = torch.full((1, 8), 3)  # the same token at every position
        with torch.no_grad():
            logits = model(idx)[0][0]
            model.pos_emb.weight.zero_()
            without = model(idx)[0][0]
        self.assertGreater((logits[1:] - logits[0]).abs().amax(-1).min().item(), 1e-4)  # each position its own
        self.assertLess((without[1:] - without[0]).abs().max().item(), 1e-6)  # without it, one answer

    def test_permuting_the_context_changes_the_last_logits_and_without_pos_emb_one_block_sees_a_set(self):
        # catches: forward without pos_emb or with positions all 0 (one block then sees the context as a set)
        idx = torch.tensor([[4, 1, 7, 2, 9, 0, 5, 3]])
        permuted = idx[:, [6, 3, 0, 5, 1, 4, 2, 7]]  # the same tokens before the last one, in another order
        for n_layer, positions in ((1, True), (3, True), (3, False), (1, False)):
            model = nudged(tiny_model(n_layer=n_layer, seed=2), scale=0.2)
            with self.subTest(n_layer=n_layer, positions=positions), torch.no_grad():
                if not positions:
                    model.pos_emb.weight.zero_()
                gap = (model(idx)[0][0, -1] - model(permuted)[0][0, -1]).abs().max().item()
                if n_layer == 1 and not positions:
                    self.assertLess(gap, 1e-5)  # one block, no positions: the last token sees a set
                else:  # deeper, the earlier tokens' own causal contexts still differ
                    self.assertGreater(gap, 1e-3)

    def test_a_block_adds_attention_of_ln1_x_then_the_feed_forward_of_ln2_of_that_sum(self):
        # catches: ffwd(ln1(x)), ffwd(x) (no ln2), ffwd(ln2 of the block's input, before attention), post-norm
        block = nudged(tiny_model(n_embd=16, seed=3), scale=0.3).blocks[0]
        with torch.no_grad():
            block.ln2.weight.uniform_(0.5, 2.0)  # ln2 no identity, and unlike ln1
            block.ln2.bias.normal_(0, 0.5)
            x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
            h = x + block.attn(block.ln1(x))
            out = block(x)
            self.assertTrue(torch.allclose(out, h + block.ffwd(block.ln2(h)), atol=1e-6))
            for wrong in (h + block.ffwd(block.ln1(h)), h + block.ffwd(h), h + block.ffwd(block.ln2(x)),
                          block.ln2(h + block.ffwd(h))):
                self.assertFalse(torch.allclose(out, wrong, atol=1e-3))  # each of those bugs would show

    def test_the_feed_forward_reads_a_normalized_stream_however_large_the_block_input(self):
        # catches: ffwd(x) or ffwd(ln1(x)) in place of ffwd(ln2(x)): unnormalized, or normalized with ln1's gains
        block = nudged(tiny_model(n_embd=16, seed=4), scale=0.3).blocks[0]
        seen = []
        block.ffwd.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            block.ln2.weight.uniform_(0.5, 2.0)
            block.ln2.bias.normal_(0, 0.5)
            for scale in (1.0, 100.0, 1e4):
                block(x * scale)
                z = (seen[-1] - block.ln2.bias) / block.ln2.weight  # undo ln2's gain and shift
                with self.subTest(scale=scale):
                    self.assertLess(z.mean(-1).abs().max().item(), 1e-4)  # each token: mean 0 ...
                    self.assertLess((z.var(-1, unbiased=False) - 1).abs().max().item(), 1e-3)  # ... variance 1

class TestEvaluation(DataDirTest):
    """The eval: the mean loss over evenly spread windows, dropout off, a sample of a fixed seed, bits per char."""

    def recorded_eval(self, block_size=16, **settings):  # -> a tiny model, its estimate_loss, each batch's starts
        calls, real_get_batch = [], gpt.get_batch

        def get_batch(split, starts):
            calls.append((split, list(starts)))
            return real_get_batch(split, starts)
        self.use_data(block_size=block_size, get_batch=get_batch, **settings)
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=block_size)
        return model, gpt.estimate_loss(model, self.meta), calls

    def test_the_eval_windows_are_spread_evenly_over_each_split_at_whole_block_starts(self):
        # catches: starts without `* block_size`, the first k windows only, i * k // n, n = N // T (a last window
        # one token short of its target, when T divides N)
        T = next(t for t in (8, 16, 4, 2, 1) if self.meta['val_tokens'] % t == 0)  # N = n * T + T: the edge case
        _, _, calls = self.recorded_eval(T, batch_size=5, eval_iters=1)
        for split in ('train', 'val'):
            N = self.meta[f'{split}_tokens']
            n = (N - 1) // T
            k = min(n, 5)
            starts = [s for name, batch in calls if name == split for s in batch]
            self.assertEqual(starts, [i * n // k * T for i in range(k)])
            self.assertGreater(starts[-1], (n - 1) * T * 0.7)  # the last window near the end of the split ...
            self.assertLessEqual(starts[-1] + T + 1, N)  # ... and wholly inside it (inputs and targets)
        _, _, calls = self.recorded_eval(T, batch_size=5, eval_iters=1000)  # more asked than there are: all, once
        n = (self.meta['val_tokens'] - 1) // T
        self.assertEqual([s for name, batch in calls if name == 'val' for s in batch], [i * T for i in range(n)])

    def test_the_eval_loss_is_the_plain_mean_over_all_windows_even_with_a_short_last_batch(self):
        # catches: `* batch_size` instead of `* len(x)`, the mean of batch means, / number of batches
        n = (self.meta['val_tokens'] - 1) // 16
        batch_size = next(b for b in (4, 5, 6, 7) if n % b not in (0, 1))  # a last batch of 2 or more, short
        model, losses, calls = self.recorded_eval(batch_size=batch_size, eval_iters=1000)
        sizes = [len(batch) for name, batch in calls if name == 'val']
        self.assertLess(sizes[-1], batch_size)  # the case at hand: k is not a multiple of batch_size
        per_window = [model(*gpt.get_batch('val', [i * 16]))[1].item() for i in range(n)]  # a plain loop
        self.assertAlmostEqual(losses['val'], sum(per_window) / n, places=5)
        batch_means = [np.mean(per_window[i:i + batch_size]) for i in range(0, n, batch_size)]
        self.assertGreater(abs(np.mean(batch_means) - losses['val']), 1e-4)  # the weighting is what is tested

    def test_the_eval_measures_the_model_with_dropout_off(self):
        thinned = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.5).train()
        plain = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.0)  # the same weights
        self.use_data(batch_size=3, eval_iters=2)
        first, second = (gpt.estimate_loss(thinned.train(), self.meta) for _ in range(2))
        without = gpt.estimate_loss(plain, self.meta)
        for split in ('train', 'val'):
            self.assertAlmostEqual(first[split], second[split], places=6)
            self.assertAlmostEqual(first[split], without[split], places=5)

    def test_two_evals_of_the_same_weights_print_the_same_sample(self):
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16, dropout=0.2)
        self.use_data(batch_size=3, eval_iters=2, seed=1337)
        samples = []
        for seed in (1, 2):
            torch.manual_seed(seed)  # whatever drew random numbers before
            model.train()  # as training leaves it
            samples.append(gpt.evaluate(model, self.meta)[3])
        self.assertGreater(len(samples[0].strip()), 20)
        self.assertEqual(samples[0], samples[1])

    def test_bits_per_character_are_the_val_loss_times_tokens_per_character_over_ln_2(self):
        tok, n = gpt.BPETokenizer(TestTokenizers.MERGES), self.meta['train_chars']
        folder = write_data(os.path.join(self.dir, 'bpe'), tok.encode(TEXT[:n]), tok.encode(TEXT[n:]),
                            {'kind': 'bpe', 'merges': TestTokenizers.MERGES}, (n, len(TEXT) - n))
        meta = self.use_data(data_dir=folder, eval_iters=2, seed=0)
        self.assertLess(meta['val_tokens'], meta['val_chars'])  # BPE: fewer tokens than characters
        _, val_loss, bpc, _ = gpt.evaluate(tiny_model(vocab_size=tok.vocab_size, block_size=16), meta)
        self.assertAlmostEqual(bpc, val_loss * meta['val_tokens'] / meta['val_chars'] / math.log(2), places=6)

class RunTest(DataDirTest):
    """DataDirTest, with runs of gpt.py's command line: that must succeed, or with a step patched."""

    def succeeded(self, args, script='gpt.py'):  # -> what the command line printed; it must exit 0
        code, out, err = cli(script, args)
        self.assertEqual(code, 0, err)
        return out

    def trained(self, *args, **overrides):
        return self.succeeded(self.train_args(**overrides) + list(args))

    def load(self, name, out='out'):
        return torch.load(os.path.join(self.dir, out, name), weights_only=True)

    def losses(self, printed):  # the log lines' (step, loss)
        return re.findall(r"iter (\d+)/\d+: loss (\S+),", printed)

    def patched_step(self, at, action=lambda: None, bad=None):
        """gpt.train_step with action() at the start of step `at`; from that step on, the loss times bad (nan, inf)."""
        real_step, real_loss = gpt.train_step, gpt.F.cross_entropy

        def step(*args):  # (model, optimizer, it)
            if args[-1] == at:
                action()
            scale = 1.0 if bad is None or args[-1] < at else float(bad)
            with mock.patch.object(gpt.F, 'cross_entropy', lambda *a: real_loss(*a) * scale):
                return real_step(*args)
        return mock.patch.object(gpt, 'train_step', step)

class TestTraining(RunTest):
    """The schedule, one optimizer step, and the loop's log: what each step trains on, with which rate."""
    TINY = dict(device='cpu', dtype='float32', compile=False, seed=0, block_size=8, n_layer=2, n_head=2, n_embd=16,
                dropout=0.0, weight_decay=0.1, beta1=0.9, beta2=0.99)  # gpt.build(11)'s settings
    STEP = dict(grad_clip=0.0, dtype='float32', device='cpu', gradient_accumulation_steps=1, learning_rate=1.0,
                warmup_iters=0, lr_decay_iters=100, min_lr=0.1, seed=1337, rank=0)  # train_step's: lr 1, no clip
    LOG_ENDS = [(7, 3, [3, 6, 7]), (6, 3, [3, 6])]  # max_iters, log_interval, the steps logged

    def a_step_of(self, model, optimizer, it, batch, **settings):  # train_step on this batch, STEP's settings or these
        with mock.patch.multiple(gpt, **{**self.STEP, 'get_batch': lambda split: batch, **settings}):
            return gpt.train_step(model, optimizer, it)

    def test_the_lr_warms_up_linearly_from_above_zero_then_follows_half_a_cosine_to_min_lr_then_stays(self):
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

    def test_every_param_group_steps_with_the_scheduled_lr(self):
        with mock.patch.multiple(gpt, **self.TINY):
            model, optimizer = gpt.build(11)
        batch, seen = (torch.randint(11, (2, 8)), torch.randint(11, (2, 8))), []
        schedule = dict(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=10, grad_clip=1.0)
        its = (0, 2, 4, 7, 9, 15)
        for it in its:
            self.a_step_of(model, optimizer, it, batch, **schedule)
            seen.append([g['lr'] for g in optimizer.param_groups])  # the rate each of the two groups stepped with
        with mock.patch.multiple(gpt, **schedule):
            expected = [[gpt.get_lr(it)] * 2 for it in its]
        self.assertEqual(seen, expected)
        self.assertEqual(len({lrs[0] for lrs in expected}), len(its))  # six different rates

    def test_weight_decay_pulls_matrices_and_embeddings_but_not_biases_or_layernorm_gains(self):
        with mock.patch.multiple(gpt, **self.TINY, learning_rate=0.5):
            model, optimizer = gpt.build(11)
        decayed = {f'{name}.weight' for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
                   and name != 'lm_head'}  # lm_head.weight is tok_emb.weight
        names = {id(p): n for n, p in model.named_parameters()}
        decay_of = {names[id(p)]: g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
        self.assertEqual(decay_of, {n: 0.1 if n in decayed else 0.0 for n in names.values()})
        self.assertEqual(sum(len(g['params']) for g in optimizer.param_groups), len(names))  # every parameter, once
        self.assertTrue(any('ln' in n for n in set(names.values()) - decayed))  # LayerNorm gains and biases
        self.assertEqual({g['betas'] for g in optimizer.param_groups}, {(0.9, 0.99)})  # the configured betas
        # What the optimizer does with it: with a zero gradient, AdamW's step is the decay alone.
        with torch.no_grad():
            for p in model.parameters():  # biases nonzero and gains off 1, so that a decay of them would show
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
                p.grad = torch.zeros_like(p)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        for n, p in model.named_parameters():
            factor = 1 - 0.5 * 0.1 if n in decayed else 1.0
            self.assertTrue(torch.allclose(p.detach(), before[n] * factor, atol=1e-6), n)

    def test_a_gradient_larger_than_grad_clip_is_scaled_down_to_norm_grad_clip(self):
        batch = tuple(torch.randint(11, (2, 4, 8), generator=torch.Generator().manual_seed(0)))  # (x, y)

        def update(grad_clip):  # the SGD step (lr 1) is minus the gradient that the step applied
            model = tiny_model().train()
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            self.a_step_of(model, torch.optim.SGD(model.parameters(), lr=1.0), 0, batch, grad_clip=grad_clip)
            return torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        free = update(0.0)  # off: the whole gradient
        clip = free.norm().item() / 100
        clipped = update(clip)
        self.assertAlmostEqual(clipped.norm().item(), clip, delta=clip * 1e-4)  # capped at grad_clip ...
        self.assertTrue(torch.allclose(clipped, free / 100, atol=1e-7))  # ... in the same direction
        self.assertTrue(torch.allclose(update(free.norm().item() * 2), free, atol=1e-7))  # a small one passes

    def test_each_step_trains_on_its_own_batches_and_the_same_step_on_the_same_ones(self):
        drawn, real_get_batch = [], gpt.get_batch

        def get_batch(split, starts=None):
            x, y = real_get_batch(split, starts)
            drawn.append(x)
            return x, y
        self.use_data(get_batch=get_batch, seed=1337, rank=0, grad_clip=1.0, gradient_accumulation_steps=1,
                      learning_rate=1e-3, warmup_iters=0)
        model = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16).train()
        for it in (3, 4, 3):
            torch.rand(it)  # whatever ran before: the step's own seed decides
            gpt.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), it)
        self.assertTrue(torch.equal(drawn[0], drawn[2]))  # step 3 twice: the same rows
        self.assertFalse(torch.equal(drawn[0], drawn[1]))  # step 4: others
        self.assertGreater(len({row for x in drawn[:2] for row in map(tuple, x.tolist())}), 4)

    def test_log_csv_has_a_row_per_log_step_and_per_eval_with_the_lr_of_its_step_and_a_resume_appends(self):
        with mock.patch.object(gpt, 'train_step', mock.Mock(wraps=gpt.train_step)) as step, \
                mock.patch.object(gpt, 'time', mock.Mock(time=lambda: 0.25 * step.call_count)):  # 0.25 s a step
            self.trained(max_iters=6, log_interval=2)
            log = self.trained('--init_from=resume', log_interval=3)
        rows = csv_rows(os.path.join(self.dir, 'out', 'log.csv'))
        self.assertEqual(list(rows[0]), ['iter', 'train_loss', 'val_loss', 'val_bpc', 'lr'])
        self.assertEqual([int(r['iter']) for r in rows if r['val_loss'] == ''], [2, 4, 6, 9, 12])
        self.assertEqual([int(r['iter']) for r in rows if r['val_loss'] != ''], [0, 6, 6, 12])  # resumed: 6 again
        with mock.patch.multiple(gpt, **{**gpt.DEFAULTS, 'warmup_iters': 2, 'lr_decay_iters': 12}):  # as in train_args
            self.assertEqual([r['lr'] for r in rows], [f"{gpt.get_lr(int(r['iter'])):.4g}" for r in rows])
        self.assertEqual(re.findall(r'(\d+) ms/iter', log), ['250'] * 2)  # 0.25 s a step, the evals not counted

    def test_the_last_step_gets_exactly_one_log_row_whatever_the_log_interval(self):
        for max_iters, log_interval, logged in self.LOG_ENDS:
            with self.subTest(max_iters=max_iters, log_interval=log_interval):
                out = f'{max_iters}_{log_interval}'
                printed = self.trained(out=out, max_iters=max_iters, eval_interval=100, log_interval=log_interval)
                rows = csv_rows(os.path.join(self.dir, out, 'log.csv'))
                self.assertEqual([int(r['iter']) for r in rows if r['val_loss'] == ''], logged)
                self.assertEqual([int(r['iter']) for r in rows if r['val_loss'] != ''], [0, max_iters])
                self.assertEqual([int(step) for step, _ in self.losses(printed)], logged)

class TestCheckpointsAndResume(RunTest):
    """What a checkpoint holds, and a resume: bit-exact, with the run's own settings and data, or refused."""
    ODD = dict(n_layer=1, n_head=3, n_embd=24, block_size=12, batch_size=3, dropout=0.1, learning_rate=3e-3,
               weight_decay=0.05, beta2=0.9, grad_clip=0.5, seed=7, warmup_iters=5, min_lr=1e-4, max_iters=100,
               lr_decay_iters=90, eval_interval=50, eval_iters=3, log_interval=7)  # a run unlike the defaults

    def stopped(self, at, args):  # gpt.py's command line, stopped by SIGTERM in step `at`: -> what it printed
        with self.patched_step(at, lambda: gpt.stops.append(signal.SIGTERM)):
            code, out, err = cli('gpt.py', args)
        self.assertEqual((code, err), (128 + signal.SIGTERM, ''))
        return out

    def test_resume_is_bit_exact(self):
        full = self.trained(out='full', dropout=0.1)
        first = self.trained(out='split', dropout=0.1, max_iters=6)
        second = self.trained('--init_from=resume', out='split', dropout=0.1)
        self.assertEqual(len(self.losses(full)), 12)
        self.assertEqual(self.losses(full), self.losses(first) + self.losses(second))
        a, b = self.load('last.pt', 'full'), self.load('last.pt', 'split')
        self.assertEqual((a['iter_num'], b['iter_num']), (12, 12))
        self.assertTrue(all(torch.equal(a['model'][key], b['model'][key]) for key in a['model']))

    def test_a_checkpoint_round_trip_gives_identical_logits_in_eval_mode_and_loads_weights_only(self):
        self.trained(max_iters=3, lr_decay_iters=3, dropout=0.5)
        ckpt = self.load('ckpt.pt')
        self.assertEqual((ckpt['tokenizer'], ckpt['data_hash']), (self.meta['tokenizer'], self.meta['hash']))
        self.assertFalse(any(k.startswith('_orig_mod') for k in ckpt['model']))
        model, tok = gpt.load_model(os.path.join(self.dir, 'out'))
        self.assertEqual([name for name, m in model.named_modules() if m.training], [])  # dropout 0.5 is off
        fresh = gpt.GPT(gpt.GPTConfig(**ckpt['model_args'])).eval()
        fresh.load_state_dict(ckpt['model'])
        idx = torch.tensor([tok.encode('Sing the song')])
        self.assertTrue(torch.equal(model(idx)[0], fresh(idx)[0]))

    def test_a_bare_resume_takes_the_shape_and_settings_of_the_run_from_its_checkpoint(self):
        self.stopped(0, self.train_args(out='odd', **self.ODD))
        first = self.load('last.pt', 'odd')
        # the command the stop message prints (and --device=cpu, so that it runs on the CPU anywhere)
        self.stopped(first['iter_num'], ['--init_from=resume', f'--out_dir={self.dir}/odd', '--device=cpu'])
        second = self.load('last.pt', 'odd')
        self.assertEqual(second['iter_num'], first['iter_num'] + 1)
        self.assertEqual(second['model_args'], first['model_args'])
        self.assertEqual({**second['config'], 'init_from': None}, {**first['config'], 'init_from': None})
        self.assertEqual({k: second['config'][k] for k in self.ODD}, self.ODD)

    def test_a_resumed_run_keeps_its_dtype_while_the_machine_decides_device_and_compile(self):
        self.trained(max_iters=2, lr_decay_iters=2, dtype='bfloat16')
        last = self.load('last.pt')
        last['config'].update(device='cuda:0', compile=True)  # as if trained on a GPU; this machine has none
        torch.save(last, os.path.join(self.dir, 'out', 'last.pt'))
        with mock.patch.object(torch.cuda, 'is_available', return_value=False), \
                mock.patch.object(torch.backends.mps, 'is_available', return_value=False):
            printed = self.succeeded(['--init_from=resume', f'--out_dir={self.dir}/out', '--max_iters=4'])
        self.assertIn(' on cpu in bfloat16\n', printed)  # the checkpoint's dtype, not auto's float32
        config = self.load('last.pt')['config']
        self.assertEqual([config[k] for k in ('device', 'dtype', 'compile')], ['cpu', 'bfloat16', False])
        self.assertIn(' on cpu in float32\n', self.trained('--init_from=resume', max_iters=6, dtype='auto'))

    def test_a_resume_from_another_folder_finds_the_runs_data(self):
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.dir)
        printed = self.stopped(3, self.train_args(max_iters=100) + ['--data_dir=data', '--out_dir=my run'])
        self.assertIn('stopped by SIGTERM at iter 4; resume with --init_from=resume --out_dir=my run', printed)
        os.chdir(tempfile.mkdtemp(dir=self.dir))  # elsewhere, where no 'data' folder is
        self.succeeded(['--init_from=resume', f'--out_dir={self.dir}/my run', '--device=cpu', '--max_iters=6'])
        last = self.load('last.pt', 'my run')
        self.assertEqual((last['iter_num'], last['config']['data_dir']), (6, self.data_dir))  # in full
        self.assertEqual(os.listdir('.'), [])  # it ran no prepare.py here: it found the run's data

    def test_ckpt_pt_keeps_the_best_val_and_a_worse_eval_never_overwrites_it(self):
        vals = iter([3.0, 2.0, 2.5, 2.5, 2.2])  # the val losses at iter 0, 3, 6; resumed: 6 again, 9
        with mock.patch.object(gpt, 'evaluate', lambda model, meta: (1.0, next(vals), 1.0, 'text')):
            self.trained(max_iters=6, eval_interval=3)
            self.assertEqual((self.load('ckpt.pt')['iter_num'], self.load('ckpt.pt')['best_val_loss']), (3, 2.0))
            self.assertEqual((self.load('last.pt')['iter_num'], self.load('last.pt')['best_val_loss']), (6, 2.0))
            self.trained('--init_from=resume', max_iters=9, eval_interval=3)  # the best val goes on with the run
        self.assertEqual((self.load('ckpt.pt')['iter_num'], self.load('last.pt')['iter_num']), (3, 9))

    def test_a_resume_trains_the_steps_left_one_before_max_iters_and_at_max_iters_none_in_one_line(self):
        out = os.path.join(self.dir, 'out')
        self.stopped(4, self.train_args(max_iters=6, lr_decay_iters=6, log_interval=4))  # last.pt at iter 5
        with mock.patch.object(gpt, 'train_step', mock.Mock(wraps=gpt.train_step)) as step:
            self.succeeded(['--init_from=resume', f'--out_dir={out}', '--device=cpu'])  # bare
        self.assertEqual([c.args[-1] for c in step.call_args_list], [5])  # the one step left; then eval and save
        rows = [(r['iter'], r['val_loss'] != '') for r in csv_rows(os.path.join(out, 'log.csv'))]
        self.assertEqual(rows, [('0', True), ('4', False), ('6', False), ('6', True)])  # (iter, an eval's row)
        self.assertEqual(self.load('last.pt')['iter_num'], 6)
        before = snapshot(self.dir)
        for more in ([], ['--max_iters=3']):  # at its max_iters, or past a lowered one: no step is left
            code, _, err = cli('gpt.py', ['--init_from=resume', f'--out_dir={out}', '--device=cpu', *more])
            self.assertEqual((code, err), (2, f"error: {out}/ is at iter 6; resume with a larger --max_iters\n"))
        self.assertEqual(snapshot(self.dir), before)

    def test_a_resume_on_other_data_is_refused_in_one_line_and_the_same_data_prepared_again_resumes(self):
        self.trained(max_iters=3, lr_decay_iters=12)
        other = pathlib.Path(self.dir, 'other.txt')  # the same characters, in another order: the same vocabulary
        other.write_text(''.join(reversed(TEXT.splitlines(keepends=True))), encoding='utf-8')
        quiet(prepare.prepare, str(other), self.data_dir)  # into the run's own data_dir
        before = snapshot(self.dir)
        code, _, err = cli('gpt.py', self.train_args() + ['--init_from=resume'])
        self.assertEqual((code, err), (2, f"error: {self.dir}/out/ was trained on other data; resume it on its own, "
                                          "or use a new --out_dir\n"))
        self.assertEqual(snapshot(self.dir), before)
        copy = pathlib.Path(self.dir, 'copy.txt')  # the run's text again, from another file: the hash is of content
        copy.write_text(TEXT, encoding='utf-8')
        quiet(prepare.prepare, str(copy), self.data_dir)
        self.trained('--init_from=resume')
        self.assertEqual(self.load('last.pt')['iter_num'], 12)

class TestSafetyNet(RunTest):
    """Nothing lost, nothing silent: a failed write, a nan, a stop, two runs at once; one line per common mistake;
    the command line's help; the scripts from a fresh folder and without POSIX-only modules."""
    MISTAKES = [  # (script, its arguments after a new run's, the one line's first words); {d}: the test's folder
        ('gpt.py', '--n_layers=3', 'unknown setting --n_layers=3; python gpt.py --help lists them'),
        ('gpt.py', 'n_layer=2', 'unknown setting n_layer=2'),
        ('gpt.py', '--n_layer=two', '--n_layer=two: expected int'),
        ('gpt.py', '--compile=maybe', '--compile=maybe: expected true or false'),
        ('gpt.py', '--n_embd=30 --n_head=4', '--n_embd=30 must be a multiple of --n_head=4'),
        ('gpt.py', '--block_size=5000', '--block_size=5000 is not shorter than the train split'),
        ('gpt.py', '--device=gpu', '--device=gpu is not available on this machine'),
        ('gpt.py', '--init_from=resume --out_dir={d}/empty', 'no checkpoint in {d}/empty/ to resume'),
        ('sample.py', '--out_dir={d}/empty', 'no checkpoint at {d}/empty/ckpt.pt'),
        ('gpt.py', '--out_dir={d}/run', '{d}/run/ holds a run; resume it'),
        ('gpt.py', '--out_dir={d}/claimed', "{d}/claimed/ holds another run's log.csv"),
        ('gpt.py', '--init_from=resume --out_dir={d}/run --n_layer=3', '--n_layer=3, but a resumed run keeps its 2'),
        ('gpt.py', '--init_from=resume --out_dir={d}/run --beta2=0.9', '--beta2=0.9, but a resumed run keeps its 0.95'),
        ('gpt.py', '--init_from=resume --out_dir={d}/run --max_iters=2', '{d}/run/ is at iter 2; resume'),
        ('gpt.py', '--init_from=resume --out_dir={d}/run --data_dir={d}/other', '{d}/run/ was trained on other data'),
    ]

    @classmethod
    def setUpClass(cls):  # the one real `python gpt.py` (~4 s: it starts prepare.py) runs while the others do
        cls.fresh = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.fresh.cleanup)
        pathlib.Path(cls.fresh.name, 'input.txt').write_text(TEXT, encoding='utf-8')
        tiny = [a for a in training_args('.', max_iters=4, n_layer=1, log_interval=2) if '_dir=' not in a]
        cls.gpt_py = subprocess.Popen([sys.executable, os.path.join(HERE, 'gpt.py'), *tiny], cwd=cls.fresh.name,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cls.addClassCleanup(cls.gpt_py.__exit__, None, None, None)  # closes its pipes and waits for it
        cls.addClassCleanup(cls.gpt_py.kill)  # first, in case its test did not wait for it

    def signalled_in_step_3(self, args, sig, nohup=False):
        """In a forked child: gpt.py's command line from a terminal, or under nohup (SIGHUP ignored), sent sig."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)  # fork: POSIX, with SIGHUP
        importlib.reload(gpt)  # gpt.py decides on import which signals a run takes
        with self.patched_step(3, lambda: os.kill(os.getpid(), sig)):  # in its step 3
            gpt.run_cli(gpt.main, args)

    @unittest.skipIf(resource is None or FORK is None, 'RLIMIT_FSIZE and fork are POSIX')
    def test_a_write_that_cannot_complete_ends_the_run_and_keeps_the_checkpoints_it_had(self):
        self.trained(max_iters=6)
        checkpoints = [pathlib.Path(self.dir, 'out', name) for name in ('ckpt.pt', 'last.pt')]
        before = {path: path.read_bytes() for path in checkpoints}

        def resume_with_a_file_size_limit():  # below a checkpoint's size: as if the disk filled up in its write
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write past it fails (EFBIG), not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(before[checkpoints[1]]) // 2, resource.RLIM_INFINITY))
            gpt.run_cli(gpt.main, self.train_args() + ['--init_from=resume'])
        code, printed = forked(resume_with_a_file_size_limit)
        self.assertNotIn(code, (0, None), printed)
        self.assertIn('File too large', printed)  # an OSError, in a traceback
        for path in checkpoints:
            self.assertEqual(path.read_bytes(), before[path], path)
            self.assertEqual(torch.load(path, weights_only=True)['iter_num'], 6)

    def test_a_stop_right_after_a_step_whose_loss_was_nan_leaves_last_pt_as_it_was(self):
        last, kept = pathlib.Path(self.dir, 'out', 'last.pt'), []

        def stop_asked():  # in step 7, with last.pt as the eval at iter 6 saved it
            kept.append(last.read_bytes())
            gpt.stops.append(signal.SIGTERM)
        with self.patched_step(7, stop_asked, bad='nan'):  # the weights turn nan in the step
            code, out, err = cli('gpt.py', self.train_args(log_interval=100))
        self.assertEqual((code, err), (1, 'error: the sum of weights is nan at iter 8; lower --learning_rate\n'))
        self.assertNotIn('stopped by', out)
        self.assertEqual(last.read_bytes(), kept[0])

    def test_a_loss_of_nan_or_inf_stops_the_run_and_keeps_the_last_good_checkpoint(self):
        self.trained(max_iters=6)
        before = [self.load(name) for name in ('ckpt.pt', 'last.pt')]
        for bad in ('nan', 'inf'):  # a check by math.isnan alone would let inf overwrite the checkpoints
            with self.subTest(bad), self.patched_step(7, bad=bad):
                code, _, err = cli('gpt.py', self.train_args() + ['--init_from=resume'])
            self.assertEqual((code, err), (1, f'error: the loss is {bad} at iter 8; lower --learning_rate\n'))
            for name, old in zip(('ckpt.pt', 'last.pt'), before):  # the state of iter 6 (evaluated again)
                new = self.load(name)
                self.assertEqual((new['iter_num'], new['best_val_loss']), (old['iter_num'], old['best_val_loss']))
                self.assertTrue(all(torch.equal(new['model'][k], v) for k, v in old['model'].items()))

    @unittest.skipIf(FORK is None, 'signals to a forked copy of this process')
    def test_ctrl_c_sigterm_or_sighup_in_training_saves_last_pt_that_resumes(self):
        for sig in [getattr(signal, name) for name in ('SIGINT', 'SIGTERM', 'SIGHUP') if hasattr(signal, name)]:
            with self.subTest(sig.name):
                code, printed = forked(self.signalled_in_step_3, self.train_args(out=sig.name), sig)
                self.assertEqual(code, 128 + sig, printed)
                self.assertEqual(self.load('last.pt', sig.name)['iter_num'], 4)
                if sig == getattr(signal, 'SIGHUP', None):  # the terminal is gone: nothing more is printed
                    self.assertTrue(printed.splitlines()[-1].startswith('iter 3/12: loss'), printed)
                else:
                    self.assertTrue(printed.endswith(f'stopped by {sig.name} at iter 4; resume with --init_from=resume '
                                                     f'--out_dir={self.dir}/{sig.name}\n'), printed)
                self.trained('--init_from=resume', out=sig.name, max_iters=5)
                self.assertEqual(self.load('last.pt', sig.name)['iter_num'], 5)

    @unittest.skipIf(FORK is None or not hasattr(signal, 'SIGHUP'), 'SIGHUP and nohup are POSIX')
    def test_a_run_started_under_nohup_keeps_ignoring_sighup(self):
        code, printed = forked(self.signalled_in_step_3, self.train_args(max_iters=6), signal.SIGHUP, True)
        self.assertEqual(code, 0, printed)
        self.assertEqual(self.load('last.pt')['iter_num'], 6)  # the run went on to its end

    def test_of_two_new_runs_into_one_out_dir_the_second_refuses_in_one_line_and_the_first_goes_on(self):
        out, second, real_evaluate = pathlib.Path(self.dir, 'out'), [], gpt.evaluate

        def evaluate(model, meta):  # the first eval: the first run holds log.csv, and no checkpoint yet
            if not second:  # out_dir before, the second run started now into it, out_dir after
                second.extend([snapshot(out), cli('gpt.py', self.train_args()), snapshot(out)])
            return real_evaluate(model, meta)
        with mock.patch.object(gpt, 'evaluate', evaluate):
            self.trained()
        before, (code, _, err), after = second
        self.assertEqual((code, err), (2, f"error: {out}/ holds another run's log.csv; use another --out_dir\n"))
        self.assertEqual(list(before), [out / 'log.csv'])
        self.assertEqual(after, before)
        self.assertEqual([int(r['iter']) for r in csv_rows(out / 'log.csv')], [0, *range(1, 7), 6, *range(7, 13), 12])
        self.assertEqual(self.load('last.pt')['iter_num'], 12)

    @unittest.skipIf(FORK is None, 'a process killed')
    def test_a_kill_during_the_first_checkpoint_write_leaves_no_half_checkpoint_and_a_new_run_there_says_why(self):
        def killed_in_fsync():
            with mock.patch.object(gpt.os, 'fsync', lambda fd: os.kill(os.getpid(), signal.SIGKILL)):
                gpt.run_cli(gpt.main, self.train_args())
        code, printed = forked(killed_in_fsync)
        out = os.path.join(self.dir, 'out')
        self.assertEqual(code, -signal.SIGKILL, printed)
        self.assertEqual(sorted(os.listdir(out)), ['ckpt.pt.tmp', 'log.csv'])  # killed in the very first write
        for more, line in (([], f"error: {out}/ holds another run's log.csv; use another --out_dir\n"),
                           (['--init_from=resume'], f"error: no checkpoint in {out}/ to resume; train one first: "
                                                    "python gpt.py\n")):
            self.assertEqual(cli('gpt.py', self.train_args() + more)[::2], (2, line))
        self.trained(out='out2')
        os.remove(os.path.join(self.dir, 'out2', 'last.pt'))  # as if killed in the first last.pt's write
        best = self.load('ckpt.pt', 'out2')['iter_num']
        printed = self.trained('--init_from=resume', out='out2', max_iters=14, lr_decay_iters=14)
        self.assertEqual(re.findall(r'iter (\d+): train loss', printed)[0], str(best))  # it resumed from ckpt.pt

    def test_each_common_mistake_ends_in_one_line_with_exit_code_2_and_changes_no_file(self):
        d = self.dir
        self.trained(out='run', max_iters=2, lr_decay_iters=2)
        os.makedirs(f'{d}/empty')
        os.makedirs(f'{d}/claimed')  # a folder another new run claimed: it holds log.csv, and no checkpoint yet
        pathlib.Path(d, 'claimed', 'log.csv').write_text('iter,train_loss,val_loss,val_bpc,lr\n')
        pathlib.Path(d, 'other.txt').write_text('abcdefghij' * 50)
        quiet(prepare.prepare, f'{d}/other.txt', f'{d}/other')
        before = snapshot(d)
        for script, args, words in self.MISTAKES:
            args = args.format(d=d).split()
            with self.subTest(script=script, args=args):
                code, _, err = cli(script, (self.train_args(out='new') if script == 'gpt.py' else []) + args)
                self.assertEqual(code, 2, err)
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertTrue(err.startswith('error: ' + words.format(d=d)), err)
        self.assertEqual(snapshot(d), before)

    def test_settings_parse_by_the_type_of_their_default(self):
        defaults = {'n_layer': 4, 'dropout': 0.1, 'compile': True, 'start': 'x'}
        self.assertEqual(gpt.parse_args(['--n_layer=6', '--dropout=0', '--compile=false', '--start=a=b'], defaults,
                                        gpt.__file__), {'n_layer': 6, 'dropout': 0.0, 'compile': False, 'start': 'a=b'})
        self.assertEqual(gpt.parse_args(['--compile=True', '--dropout=1e-1'], defaults, gpt.__file__),
                         {'compile': True, 'dropout': 0.1})

    def test_help_lists_every_key_with_its_default_and_meaning_and_its_value_on_cuda(self):
        with contextlib.redirect_stdout(io.StringIO()) as printed, self.assertRaises(SystemExit) as exit:
            gpt.main(['--n_layer=3', '--help'])  # help, whatever else is set (not cli: it reads exit code None as 1)
        self.assertIsNone(exit.exception.code)  # exit code 0
        lines = {line.split('=')[0][2:]: line for line in printed.getvalue().splitlines()}
        self.assertEqual(list(lines), list(gpt.DEFAULTS))
        for key, value in gpt.DEFAULTS.items():
            line, on_cuda = lines[key], f' (on CUDA: {gpt.GPU_RECIPE[key]})' if key in gpt.GPU_RECIPE else ''
            self.assertRegex(line, rf'^--{key}={re.escape(repr(value))} +\S.*\S{re.escape(on_cuda)}$')
            self.assertEqual(line.count('(on CUDA'), key in gpt.GPU_RECIPE, line)
        self.assertIn('how many independent sequences', lines['batch_size'])

    def test_importing_gpt_prepare_or_sample_has_no_side_effects(self):
        empty = tempfile.mkdtemp(dir=self.dir)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(empty)
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            for script in ('gpt.py', 'prepare.py', 'sample.py'):  # what `import` runs, as a module not __main__
                runpy.run_path(os.path.join(HERE, script), run_name='imported')
        self.assertEqual((out.getvalue(), err.getvalue(), os.listdir(empty)), ('', '', []))

    def test_python_gpt_py_in_a_folder_with_input_txt_alone_prepares_trains_and_sample_py_reads_the_run(self):
        stdout, stderr = self.gpt_py.communicate(timeout=120)  # setUpClass started it
        self.assertEqual(self.gpt_py.returncode, 0, stderr)
        self.assertTrue(stdout.startswith('input.txt: 3,440 characters'), stdout)  # prepare.py ran first
        self.assertIn('iter 4: train loss', stdout)
        self.assertEqual(sorted(os.listdir(self.fresh.name)), ['data', 'input.txt', 'out'])
        printed = self.succeeded([f'--out_dir={self.fresh.name}/out', '--start=Sing the', '--num_samples=2',
                                  '--max_new_tokens=20', '--device=cpu'], 'sample.py')
        samples = printed.split('-' * 20 + ' sample ')[1:]
        self.assertEqual(len(samples), 2)
        self.assertTrue(all(s.split('\n', 1)[1].startswith('Sing the') for s in samples), printed)

    def test_the_scripts_import_and_run_without_posix_only_modules_as_on_windows(self):
        # fcntl, resource and os.sysconf are gone (torch and numpy, imported before, need none of them on Windows)
        sysconf, out = os.sysconf, os.path.join(self.dir, 'win')
        del os.sysconf
        self.addCleanup(setattr, os, 'sysconf', sysconf)
        for s in gpt.SIGNALS:  # the fresh gpt takes them
            self.addCleanup(signal.signal, s, signal.getsignal(s))
        with mock.patch.dict(sys.modules, {'fcntl': None, 'resource': None}):  # `import fcntl` fails
            for name in ('gpt', 'prepare', 'sample', 'bench'):
                del sys.modules[name]  # mock.patch.dict puts the ones imported before back afterwards
            fresh = {name: __import__(name) for name in ('gpt', 'prepare', 'sample', 'bench')}
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                fresh['prepare'].prepare(self.input, f'{out}-data')
                fresh['gpt'].main(training_args(self.dir, out, data_dir=f'{out}-data', max_iters=2, eval_interval=2))
                fresh['sample'].main([f'--out_dir={out}', '--device=cpu', '--start=Sing', '--max_new_tokens=5'])
                fresh['bench'].main(['plot', f'--out_dir={out}'])
        self.assertIsNot(fresh['gpt'], gpt)  # run by the fresh modules
        self.assertIn('iter 2: train loss', printed.getvalue())
        self.assertIn('\nSing', printed.getvalue())
        self.assertIn(f'wrote {out}/loss.svg', printed.getvalue())

class ScriptedGPT(gpt.GPT):
    """A GPT whose logits at every position script(row) decides from the whole window it is given (no cache)."""

    def __init__(self, script, vocab_size, block_size=8):
        super().__init__(gpt.GPTConfig(vocab_size, block_size, 1, 1, 4))
        self.script = script

    def forward(self, idx, targets=None, cache=None):
        last = torch.stack([torch.as_tensor(self.script(row.tolist()), dtype=torch.float32) for row in idx])
        return last[:, None, :].expand(idx.shape[0], idx.shape[1], -1), None

def each_token_changed(row):  # (1, T) -> (T + 1, T): row 0 as it is, row i + 1 with token i changed (of 11)
    T = row.shape[1]
    return (row + torch.cat((torch.zeros(1, T), torch.eye(T))).long()) % 11

class PieceTokenizer:
    """Tokens of one or more characters, as BPE's, and two halves of 'é'; it counts the tokens of each decode."""
    pieces = [b'a', b'b', b'c', b'd', b' ', b'\n', b'ab', b'ba', b'cd', b'dc', b'abc', b'\xc3', b'\xa9']

    def __init__(self):
        self.vocab_size, self.decoded = len(self.pieces), []

    def encode(self, text):
        return [self.pieces.index(ch.encode()) for ch in text]

    def decode(self, ids):
        self.decoded.append(len(ids))
        return b''.join(self.pieces[i] for i in ids).decode('utf-8', errors='replace')

class TestGeneration(unittest.TestCase):
    """GPT.generate and sample.py: what each setting draws, the KV cache, beams, stops, streaming, the window."""

    GREEDY = [(0.0, 200, 1), (0.0, 200, 99), (1e-40, 200, 1), (1e-30, 200, 1), (1.0, 1, 1)]  # temperature, top_k, seed
    DECODERS = {  # how a text of 30 new tokens is made
        'sampled': lambda m, idx, **kw: sample.sample(m, idx, 30, generator=torch.Generator().manual_seed(7), **kw),
        'greedy': lambda m, idx, **kw: sample.sample(m, idx, 30, temperature=0, **kw),
        'beam search': lambda m, idx, **kw: sample.beam_search(m, idx[:1], 30, beams=4, **kw)}

    def test_generate_extends_by_max_new_tokens_each_a_pick_of_the_k_likeliest_tokens_of_its_own_row(self):
        # catches: `logits <= kth` (k - 1 kept), kth from row 0 or values[:, [0]], top_k ignored, an off-by-one k
        table = torch.tensor([[2.0, 5.0, 0.0, 4.0, 1.0, 3.0],  # a prompt of token 0: the top 3 are 1, 3, 5
                              [5.0, 0.0, 4.5, 1.0, 4.0, 3.5]])  # a prompt of token 1: the top 3 are 0, 2, 4
        model, idx = ScriptedGPT(lambda row: table[row[0]], vocab_size=6), torch.tensor([[0], [1]]).repeat(40, 1)
        torch.manual_seed(0)
        for top_k, rows_of_0, rows_of_1 in ((1, {1}, {0}), (3, {1, 3, 5}, {0, 2, 4}), (100, {*range(6)}, {*range(6)})):
            out = model.generate(idx, 6, temperature=20.0, top_k=top_k)  # hot: unfiltered, every token is drawn
            with self.subTest(top_k=top_k):  # 1: the argmax; 100, above the vocabulary: every token
                self.assertEqual(out.shape, (80, 7))
                self.assertEqual(set(out[0::2, 1:].flatten().tolist()), rows_of_0)  # each of the k, and no other
                self.assertEqual(set(out[1::2, 1:].flatten().tolist()), rows_of_1)
        self.assertTrue(torch.equal(model.generate(idx, 6, temperature=0), model.generate(idx, 6, top_k=1)))

    def test_sampling_at_temperature_0_or_a_tiny_one_or_with_top_k_1_is_greedy_whatever_the_seed(self):
        model, idx = tiny_model(), torch.zeros((2, 1), dtype=torch.long)
        greedy = sample.sample(model, idx, 20, temperature=0)
        for t in range(1, 9):  # inside the window: each token is the argmax of its logits
            self.assertTrue(torch.equal(greedy[:, t], model(greedy[:, :t])[0][:, -1].argmax(-1)))
        for temperature, top_k, seed in self.GREEDY:
            out = sample.sample(model, idx, 20, temperature, top_k, generator=torch.Generator().manual_seed(seed))
            self.assertTrue(torch.equal(out, greedy), (temperature, top_k, seed))
        hot = sample.sample(model, idx, 20, temperature=1e30, generator=torch.Generator().manual_seed(1))
        self.assertEqual(hot.shape, (2, 21))  # every token as likely as any other, none nan

    def test_top_p_keeps_the_smallest_set_reaching_p(self):
        logits, nucleus = torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log(), torch.tensor([[0.5 / 0.8, 0, 0.3 / 0.8, 0]])
        for top_k, top_p, kept in ((100, 0.8, 2), (100, 0.81, 3), (3, 0.6, 2)):  # of the top 3 (0.95): 0.5 / 0.95 < 0.6
            probs = torch.softmax(sample.filter_logits(logits, logits.long()[:, :0], 1.0, top_k, top_p, 1.0), -1)
            self.assertEqual((probs > 0).sum().item(), kept, (top_k, top_p))
            self.assertTrue(kept == 3 or torch.allclose(probs, nucleus))  # 0.5 + 0.3 reach 0.8

    def test_repetition_penalty_makes_seen_tokens_less_likely_also_in_greedy_decoding(self):
        logits = torch.tensor([[2.0, -1.0, 2.0, -1.0]])
        out = sample.filter_logits(logits, torch.tensor([[0, 1, 1]]), 1.0, 100, 1.0, 2.0)
        self.assertTrue(torch.equal(out, torch.tensor([[1.0, -2.0, 2.0, -1.0]])))  # seen: 2 / 2 and -1 * 2
        model, idx = tiny_model(), torch.zeros((1, 1), dtype=torch.long)
        plain, penalized = (sample.sample(model, idx, 30, temperature=0, repetition_penalty=p) for p in (1.0, 5.0))
        self.assertLess(plain[0].unique().numel(), penalized[0].unique().numel())

    def test_sampling_draws_once_from_the_softmax_of_the_top_k_logits_divided_by_the_temperature(self):
        model, idx = tiny_model(), torch.randint(11, (2, 5))
        logits = model(idx)[0][:, -1].detach()
        for temperature, top_k in ((0.5, 200), (0.5, 3), (2.0, 200), (2.0, 3)):
            with self.subTest(temperature=temperature, top_k=top_k), \
                    mock.patch.object(torch, 'multinomial', wraps=torch.multinomial) as multinomial:
                sample.sample(model, idx, 1, temperature, top_k, generator=torch.Generator().manual_seed(0))
                kept = logits >= logits.topk(min(top_k, 11)).values[:, -1:]
                expected = torch.softmax((logits / temperature).masked_fill(~kept, float('-inf')), -1)
                self.assertEqual(multinomial.call_count, 1)
                self.assertTrue(torch.allclose(multinomial.call_args[0][0], expected, atol=1e-6))

    def test_same_seed_same_sample_other_seed_other_sample(self):
        model, idx = tiny_model(), torch.zeros((2, 1), dtype=torch.long)
        a, b, c = (sample.sample(model, idx, 30, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6))
        self.assertEqual((torch.equal(a, b), torch.equal(a, c)), (True, False))

    def test_the_kv_cache_changes_no_logit_and_no_text_past_block_size_and_stays_in_place_at_one_size(self):
        real_next_logits = sample.next_logits

        def checked(model, idx, cache=None):  # each cached step, against a recompute of the same window
            logits = real_next_logits(model, idx, cache)
            if cache is not None:
                gaps.append((logits - real_next_logits(model, idx)).abs().max().item())
                self.assertEqual(cache.filled, idx.shape[1] - sample.window_start(idx.shape[1], 8))
                buffers.update((layer.k.data_ptr(), layer.v.data_ptr(), layer.k.shape, layer.slots.data_ptr(),
                                cache.length.data_ptr()) for layer in cache.layers)  # as a CUDA graph replays them
            return logits
        for name, decode in self.DECODERS.items():
            for flash, n_layer in ((True, 2), (False, 2), (True, 0)):  # 0: nothing to cache, but positions move
                model, idx = tiny_model(block_size=8, n_layer=n_layer, flash=flash), torch.randint(11, (2, 3))
                gaps, buffers = [], set()  # what checked() finds in this run
                with mock.patch.object(sample, 'next_logits', checked):
                    cached = decode(model, idx)
                with self.subTest(name, flash=flash, n_layer=n_layer):  # beam search reorders the cache too
                    self.assertEqual((len(gaps), cached.shape[1], len(buffers)), (30, 33, n_layer))
                    self.assertLess(max(gaps), 1e-5)
                    self.assertTrue(torch.equal(cached, decode(model, idx, use_cache=False)))

    def test_a_prompt_fed_through_the_cache_in_chunks_of_any_length_gives_the_logits_of_one_forward(self):
        idx = torch.randint(11, (2, 16))
        for flash in (True, False):
            model = tiny_model(block_size=16, flash=flash)
            for chunk in (1, 2, 3, 5, 16):
                with self.subTest(flash=flash, chunk=chunk), torch.inference_mode():
                    cache, parts = sample.KVCache(model.config), []
                    cache.clear(idx.device)
                    for i in range(0, 16, chunk):
                        parts.append(model(idx[:, i:i + chunk], cache=cache)[0])
                        cache.advance(parts[-1].shape[1])
                    self.assertLess((torch.cat(parts, dim=1) - model(idx)[0]).abs().max().item(), 1e-5)

    def test_beam_search_with_one_beam_is_greedy_and_with_more_finds_a_likelier_text_even_past_the_vocabulary(self):
        def logprob(model, seq):  # of the tokens after the 2 of the prompt
            return torch.log_softmax(model(seq[:, :-1])[0], -1)[0, 1:].gather(1, seq[0, 2:, None]).sum().item()
        model, idx = tiny_model(seed=3), torch.randint(11, (1, 2))
        greedy, beam = sample.sample(model, idx, 6, temperature=0), sample.beam_search(model, idx, 6, beams=8)
        self.assertGreaterEqual(logprob(model, beam), logprob(model, greedy) - 1e-6)
        self.assertTrue(torch.equal(sample.beam_search(model, idx, 20, beams=1), sample.sample(model, idx, 20, 0.0)))
        self.assertEqual(sample.beam_search(tiny_model(vocab_size=5), idx % 5, 4, beams=12).shape, (1, 6))  # 12 > 5

    def test_the_length_penalty_ranks_finished_beams_by_logprob_over_length_to_the_penalty(self):
        # catches: a length counting the prompt, step ** -penalty, step + 1, only unfinished beams divided, no penalty
        START, END, A = 0, 1, 2  # and token 3, never likely
        script = {(): [0.0, 0.5, 0.4, 0.1], (A,): [0.0, 0.06, 0.9, 0.04],  # the short text 'END' (1 token), or 'A'
                  (A, A): [0.0, 0.9, 0.05, 0.05]}  # ... and the long text 'A A END' (3 tokens)
        model = ScriptedGPT(lambda row: torch.tensor(script.get(tuple(row[1:]), [0.25] * 4)).clamp(1e-12).log(), 4)
        short_logprob, long_logprob = math.log(0.5), math.log(0.4) + math.log(0.9) + math.log(0.9)
        crossing = math.log(long_logprob / short_logprob) / math.log(3)  # long / 3**p == short / 1**p: p = 0.44
        for penalty in (0.0, crossing - 0.02, crossing + 0.02, 1.0, 3.0):
            out = sample.beam_search(model, torch.tensor([[START]]), 3, beams=2, length_penalty=penalty,
                                     stopped=lambda ids: ids[:, -1] == END, use_cache=False)
            long_wins = long_logprob / 3 ** penalty > short_logprob / 1 ** penalty
            self.assertEqual(out.tolist(), [[START, A, A, END]] if long_wins else [[START, END]], penalty)
            self.assertEqual(long_wins, penalty > crossing)  # 0 prefers the shorter text, a large one the longer

    def test_a_row_ends_at_its_stop_and_then_repeats_its_last_token_until_every_row_is_done(self):
        out = sample.sample(tiny_model(), torch.zeros((4, 1), dtype=torch.long), 60,
                            generator=torch.Generator().manual_seed(1), stopped=lambda ids: ids[:, -1] == 3)
        ends = [row.tolist().index(3, 1) for row in out]  # each row's first 3 after the prompt
        self.assertGreater(len(set(ends)), 1)  # rows that end at different steps
        self.assertEqual(out.shape[1], max(ends) + 1)  # the last to end ends the generation
        self.assertTrue(all((row[end:] == 3).all() for row, end in zip(out, ends)))  # the stop token, repeated

    def test_a_streamed_sample_is_the_sample_up_to_the_stop_text_and_no_step_decodes_the_whole_text(self):
        model, tok = tiny_model(vocab_size=13), PieceTokenizer()
        ids = sample.sample(model, torch.tensor([tok.encode('ab')]), 300, generator=torch.Generator().manual_seed(7))[0]
        text = tok.decode(ids.tolist())
        self.assertIn('é', text)  # streaming waited for its second byte
        ends = {len(tok.decode(ids[:t].tolist())) for t in range(3, len(ids) + 1)}  # where tokens end in the text
        stop = next(text[i:i + 3] for i in range(2, len(text) - 2) if text.find(text[i:i + 3], 2) == i
                    and i + 3 not in ends and ends & {i + 1, i + 2})  # a stop text across tokens, ending inside one
        for extra, expected in (([], text), ([f'--stop={stop}'], text[:text.find(stop, 2) + 3])):
            tok.decoded.clear()
            with mock.patch.object(sample, 'load_model', lambda path, device: (model, tok)):
                streamed = cli('sample.py', ['--device=cpu', '--start=ab', '--temperature=1', '--seed=7',
                                             '--max_new_tokens=300', '--num_samples=1', *extra])[1]
            self.assertEqual(streamed, expected + '\n')
            self.assertLess(sorted(tok.decoded)[-2], 10)  # a few tokens at a time; the whole text once, at the end

    def test_the_window_holds_all_block_size_tokens_and_at_one_more_jumps_by_half_a_block(self):
        # catches: floor for ceil, a hop of a whole block, no max(1, ...) (block_size 1), a jump at block_size + 2
        for block_size in (1, 2, 7, 8):
            hop = max(1, block_size // 2)
            starts = [sample.window_start(T, block_size) for T in range(1, 3 * block_size + 1)]
            with self.subTest(block_size=block_size):
                self.assertEqual(starts[:block_size], [0] * block_size)  # T <= block_size: the whole text
                self.assertEqual(starts[block_size], hop)  # T = block_size + 1: the first jump, by half a block
                for T, start in enumerate(starts, 1):  # a multiple of the hop, and half a block to a whole one
                    self.assertTrue(start % hop == 0 and min(T, block_size - hop + 1) <= T - start <= block_size, T)
                self.assertTrue(all(b - a in (0, hop) for a, b in zip(starts, starts[1:])))  # it moves in hops

    def test_at_block_size_tokens_the_next_token_sees_them_all_and_at_one_more_only_the_jumped_window(self):
        model = tiny_model(block_size=8)
        for T, start in ((8, 0), (9, 4)):
            prompts, cache = each_token_changed(torch.randint(11, (1, T))), sample.KVCache(model.config)
            sample.next_logits(model, prompts[:, :-1], cache)  # the cache holds the T - 1 tokens before
            for cached in (False, True):
                logits = sample.next_logits(model, prompts, cache if cached else None)
                with self.subTest(T=T, cached=cached):
                    self.assertEqual(sample.window_start(T, 8), start)
                    changed = [(logits[i + 1] - logits[0]).abs().max().item() > 1e-4 for i in range(T)]
                    self.assertEqual(changed, [i >= start for i in range(T)])  # only the window's tokens count
                    self.assertLess((logits - model(prompts[:, start:])[0][:, -1]).abs().max().item(), 1e-5)

    def test_generate_sees_all_block_size_tokens_and_at_one_more_drops_the_first(self):
        def next_of(window):  # a token that every token of the window and its place decide: change one, it changes
            return sum((i + 1) * w for i, w in enumerate(window)) * 7 % 11
        model = ScriptedGPT(lambda row: torch.eye(11)[next_of(row)] * 10, vocab_size=11, block_size=8)
        torch.manual_seed(1)
        for T in (8, 9):
            out = model.generate(each_token_changed(torch.randint(11, (1, T))), 1, temperature=0)[:, -1]
            self.assertEqual((out[1:] != out[0]).tolist(), [i >= T - 8 for i in range(T)], T)
        out = model.generate(torch.randint(11, (1, 5)), 20, temperature=0)  # then it slides one token at a time
        self.assertEqual(out[0, 5:].tolist(), [next_of(out[0, max(0, t - 8):t].tolist()) for t in range(5, 25)])

class TestSampleCommandLine(DataDirTest):
    """sample.py as a user runs it: one line for a setting that cannot work, any prompt, any run's checkpoint."""

    LOWER = 'out of memory; lower --num_samples (or --beams) or --max_new_tokens'
    MISTAKES = [  # (arguments, what the one line says); {d}: the test's folder, whose run/ knows \r but no newline
        (['--temperature=-1'], '--temperature=-1.0 must be 0 (greedy) or more'), (['--top_k=0'], '--top_k=0 must be'),
        (['--top_p=0'], '--top_p=0.0 must be in (0, 1]'), (['--top_p=1.5'], '--top_p=1.5 must be in (0, 1]'),
        (['--repetition_penalty=0'], '--repetition_penalty=0.0 must be above 0'), (['--beams=0'], '--beams=0 must be'),
        (['--max_new_tokens=-1'], '--max_new_tokens=-1 must be'), (['--num_samples=0'], '--num_samples=0 must be'),
        (['--beams=3', '--top_p=0.9'], '--beams=3 is deterministic beam search; drop --top_p'),
        (['--beams=2', '--length_penalty=nan'], '--length_penalty=nan must be a finite number'),
        (['--seed=18446744073709551616'], '--seed=18446744073709551616 must be'), (['--seed=-1'], '--seed=-1 must'),
        (['--device=gpu'], '--device=gpu is not available on this machine; use --device=cpu'),
        (['--start='], '--start is empty'),
        (['--start=FILE:{d}/none.txt'], '--start=FILE:{d}/none.txt cannot be read (No such file or directory)'),
        (['--out_dir={d}/none'], 'no checkpoint at {d}/none; train a model first: python gpt.py'),
        (['--out_dir={d}'], 'no checkpoint at {d}/ckpt.pt; train a model first'),  # a folder without one
        (['--start=\n'], "this model's vocabulary has no newline, the default start text; give one with --start="),
        (['--start=a Zé'], "characters not in the model's vocabulary: 'Zé'; remove them"),
        (['--num_samples=1000000000000'], LOWER), (['--beams=1000000000000'], LOWER)]

    def setUp(self):  # run/ holds a tiny model's last.pt, as gpt.py saves it, and no ckpt.pt
        super().setUp()
        self.run_dir, model = os.path.join(self.dir, 'run'), tiny_model(vocab_size=13)
        os.mkdir(self.run_dir)
        torch.save({'model': model.state_dict(), 'model_args': model.config._asdict(),
                    'tokenizer': {'kind': 'char', 'vocab': list(' \rabcdefghijk')}}, f'{self.run_dir}/last.pt')

    def test_a_setting_that_cannot_work_ends_in_one_line_naming_the_fix(self):
        for args, words in self.MISTAKES:
            args = ['--device=cpu', f'--out_dir={self.run_dir}', '--start=a'] + [a.format(d=self.dir) for a in args]
            with self.subTest(args=args[3:]):
                code, out, err = cli('sample.py', args)
                self.assertEqual((code, out, err.count('\n')), (2, '', 1), err)
                self.assertTrue(err.startswith('error: ') and words.format(d=self.dir) in err, err)

    def test_a_file_prompt_keeps_its_line_endings_and_a_run_with_only_last_pt_samples_from_it(self):
        pathlib.Path(self.dir, 'prompt.txt').write_bytes(b'a\rb')  # universal newlines would make \r a \n
        code, out, err = cli('sample.py', [f'--out_dir={self.run_dir}', f'--start=FILE:{self.dir}/prompt.txt',
                                           '--num_samples=1', f'--seed={2 ** 63 - 1}'])  # the largest seed
        self.assertEqual((code, err, out[:3]), (0, '', 'a\rb'))

    def test_a_bpe_model_trains_resumes_reports_bits_per_char_and_samples_from_any_start_text(self):
        data, out_dir = os.path.join(self.dir, 'bpe'), os.path.join(self.dir, 'out')
        meta = quiet(prepare.prepare, self.input, data, 'bpe', 300)
        self.assertEqual(cli('gpt.py', self.train_args(data_dir=data, max_iters=6))[0], 0)
        code, log, err = cli('gpt.py', self.train_args(data_dir=data) + ['--init_from=resume'])
        self.assertEqual((code, torch.load(f'{out_dir}/last.pt', weights_only=True)['iter_num']), (0, 12), err)
        self.assertRegex(log, r'iter 12: train loss \d\.\d+, val loss \d\.\d+, \d\.\d+ bits/char')
        row = csv_rows(os.path.join(out_dir, 'log.csv'))[-1]  # the last eval: nats per token -> bits per character
        bpc = float(row['val_loss']) * meta['val_tokens'] / meta['val_chars'] / math.log(2)
        self.assertAlmostEqual(float(row['val_bpc']), bpc, delta=1e-3)
        start, (model, tok) = 'Zebras über 🙂', gpt.load_model(out_dir)
        rows = sample.sample(model, torch.tensor([tok.encode(start)] * 2), 10, 0.8, 200,
                             generator=torch.Generator().manual_seed(1337)).tolist()  # sample.py's defaults
        out = cli('sample.py', [f'--out_dir={out_dir}', f'--start={start}', '--num_samples=2', '--max_new_tokens=10'])
        expected = ''.join(f"{'-' * 20} sample {i}\n{tok.decode(row)}\n" for i, row in enumerate(rows, 1))
        self.assertEqual(out[1], expected)
        out = cli('sample.py', [f'--out_dir={out_dir}', '--start=Zebras', '--stop=e', '--max_new_tokens=80',
                                '--temperature=2'])[1]
        for text in out.split('-' * 20 + ' sample ')[1:]:  # the stop text ends each, wherever BPE cut it into tokens
            generated = text.split('Zebras', 1)[1].rstrip('\n')
            self.assertEqual((generated.count('e'), generated[-1:]), (1, 'e'), generated)

def recounted_bpe(ids, vocab_size):
    """BPE learned the slow, obvious way: recount every pair after each merge (what prepare.py did before)."""
    merges, ids = [], np.asarray(ids)
    for new_id in range(256, vocab_size):
        counts = np.bincount(ids[:-1].astype(np.int64) * new_id + ids[1:])  # pair (a, b) -> a * new_id + b
        if counts.max() < 2:
            break
        a, b = divmod(int(counts.argmax()), new_id)  # of equal counts the first, so the smallest pair
        fused = ''.join(map(chr, ids)).replace(chr(a) + chr(b), chr(new_id))  # left to right: 'aaa' -> 'Na'
        ids = np.array([ord(c) for c in fused])
        merges.append((a, b))
    return merges, ids

def byte_ids(text):
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

def failing_open(suffix, full):
    """prepare's open, where writing a file ending in suffix fails: on a full disk (/dev/full: the file is made,
    then its writes fail) or in a read-only folder (as root, chmod would not stop the writes)."""
    def opener(path, mode='r', **kwargs):
        if str(path).endswith(suffix) and 'w' in mode:
            if not full:
                raise OSError(errno.EROFS, 'Read-only file system', path)
            open(path, mode, **kwargs).close()
            path = '/dev/full'
        return open(path, mode, **kwargs)
    return opener

class TestPrepare(DataDirTest):
    """prepare.py: the token files, the BPE merges, the data's hash, and a failure's one line that loses nothing."""

    FAILS = [  # (prepare's open, --tokenizer, --data_dir in the test's folder, why the write cannot complete)
        *[(failing_open(name, True), tok, 'data', 'No space left on device') for tok in ('char', 'bpe')
          for name in ('train.bin.tmp', 'val.bin.tmp', 'meta.json.tmp')],
        *[(failing_open('.tmp', False), tok, 'data', 'Read-only file system') for tok in ('char', 'bpe')],
        (open, 'char', 'input.txt', 'a file has that name'), (open, 'char', 'input.txt/sub', 'Not a directory')]
    DOWNLOADS = [  # (what urlopen does, prepare's open, the one line) when input.txt is missing
        ({'side_effect': OSError('no network')}, open, r'\S+/input.txt is missing and the download failed '
         r'\(no network\); save https://\S+ as \S+/input.txt by hand, or prepare a text of your own: python'),
        ({'return_value.__enter__.return_value.read.return_value': b'text'}, failing_open('.tmp', False),
         r'cannot write \S+/input.txt \(Read-only file system\); free some space, or prepare a text of your own')]
    BPE_TEXTS = ['aaaaa', 'aaaaaaaaab aaaa aaa aa a ' * 4, 'abababab abab cdcdcd ' * 5, TEXT[:2000],
                 'Ünïcödé — 漢字漢字, emoji 🙂🙂🙂, tabs\tand\r\nnewlines ' * 4,
                 *[''.join(np.random.default_rng(seed).choice(list('aab '), 400)) for seed in range(4)]]  # ties
    MERGES = [('ababcd', [(97, 98)]), ('abcdefg', []),  # ab twice; ba, bc, cd once; then (N, N), (N, c) once
              ('ababba', [(97, 98)]), ('zyzyabab', [(97, 98), (122, 121)]),  # of two pairs seen twice: the smaller
              ('acacabab', [(97, 98), (97, 99)]), ('xyxyxyabab', [(120, 121), (97, 98), (256, 256)])]  # 3 beats 2

    def test_prepare_writes_the_first_90_percent_to_train_and_the_rest_to_val_as_uint16(self):
        tok, n_train = gpt.load_tokenizer(self.meta['tokenizer']), int(len(TEXT) * 0.9)
        for split, text in (('train', TEXT[:n_train]), ('val', TEXT[n_train:])):
            ids = np.fromfile(os.path.join(self.data_dir, f'{split}.bin'), dtype=np.uint16)
            self.assertEqual(os.path.getsize(os.path.join(self.data_dir, f'{split}.bin')), 2 * len(ids))
            self.assertEqual((tok.decode(ids.tolist()), self.meta[f'{split}_tokens']), (text, len(ids)))

    def test_prepare_reads_in_chunks_with_the_same_result(self):
        with mock.patch.object(prepare, 'CHUNK', 7):
            quiet(prepare.prepare, self.input, os.path.join(self.dir, 'chunked'))
        for name in ('train.bin', 'val.bin', 'meta.json'):
            self.assertEqual(*(pathlib.Path(d, name).read_bytes() for d in (self.data_dir, f'{self.dir}/chunked')))

    def test_offline_prepare_says_how_to_get_tiny_shakespeare_and_leaves_no_file(self):
        os.remove(self.input)
        for urlopen, opener, words in self.DOWNLOADS:  # the default --input, missing
            with self.subTest(words[:30]), mock.patch.object(prepare.urllib.request, 'urlopen', **urlopen), \
                    mock.patch.multiple(prepare, open=opener, input=self.input, create=True):
                code, _, err = cli('prepare.py', [])
                self.assertEqual((code, err.count('\n')), (2, 1), err)
                self.assertRegex(err, '^error: ' + words)
                self.assertEqual(os.listdir(self.dir), ['data'])

    def test_a_write_that_cannot_complete_ends_in_one_line_keeps_the_old_data_and_leaves_no_tmp(self):
        before = snapshot(self.dir)
        for i, (opener, tokenizer, data_dir, why) in enumerate(self.FAILS):
            with self.subTest(i, tokenizer=tokenizer, why=why), mock.patch.object(prepare, 'open', opener, create=True):
                code, _, err = cli('prepare.py', [f'--input={self.input}', f'--data_dir={self.dir}/{data_dir}',
                                                  f'--tokenizer={tokenizer}', '--vocab_size=300'])
                self.assertEqual((code, err), (2, f'error: cannot write to {self.dir}/{data_dir}/ ({why}); free some '
                                                  'space, make it writable or pass another --data_dir\n'))
                self.assertEqual(snapshot(self.dir), before)  # the old data as it was, and no .tmp file

    def test_ctrl_c_while_preparing_leaves_no_tmp_and_keeps_the_old_data(self):
        before = snapshot(self.data_dir)
        for tokenizer in ('char', 'bpe'):  # stopped once both token files are written to .tmp
            with self.subTest(tokenizer), mock.patch.object(prepare, 'data_hash', side_effect=KeyboardInterrupt):
                code, _, err = cli('prepare.py', [f'--input={self.input}', f'--data_dir={self.data_dir}',
                                                  f'--tokenizer={tokenizer}'])
                self.assertEqual((code, err, snapshot(self.data_dir)), (130, 'error: stopped by Ctrl-C\n', before))

    def test_prepare_removes_meta_json_before_replacing_the_token_files_and_puts_it_back_last(self):
        # so that a stop at any replace leaves no meta.json: not the old one, which describes other tokens, nor the new
        new, meta, real_replace = f'{self.dir}/new.txt', f'{self.data_dir}/meta.json', os.replace
        pathlib.Path(new).write_text(TEXT[:-700], encoding='utf-8')  # new data: other sizes
        for name in ('train.bin', 'val.bin', 'meta.json'):
            quiet(prepare.prepare, self.input, self.data_dir)  # a whole folder of the old data

            def replace(src, dst):
                if os.path.basename(dst) == name:
                    raise KeyboardInterrupt
                return real_replace(src, dst)
            with self.subTest(stopped_at=name), mock.patch.object(prepare.os, 'replace', replace):
                code, _, _ = cli('prepare.py', [f'--input={new}', f'--data_dir={self.data_dir}'])
                self.assertEqual((code, os.path.exists(meta)), (130, False))

    def test_help_shows_how_to_run_it_every_setting_and_what_bpe_costs(self):
        out = cli('prepare.py', ['--help'])[1]
        self.assertRegex(out, r'python prepare.py --tokenizer=bpe --vocab_size=1024(.|\n)*--input=(.|\n)*'
                         r'--data_dir=(.|\n)*--tokenizer=(.|\n)*--vocab_size=1024 .*\d s .*8192')

    def test_bpe_learning_with_incremental_counts_gives_the_same_merges_and_ids_as_recounting(self):
        for text in self.BPE_TEXTS:
            for vocab_size in (257, 300, 700):  # 700: most of these texts run out of repeated pairs first
                with self.subTest(text=text[:20], vocab_size=vocab_size):
                    merges, ids = quiet(prepare.train_bpe, byte_ids(text), vocab_size)
                    expected_merges, expected_ids = recounted_bpe(byte_ids(text), vocab_size)
                    self.assertEqual((merges, ids.tolist()), (expected_merges, expected_ids.tolist()))
                    self.assertEqual(gpt.BPETokenizer(merges).encode(text), ids.tolist())

    def test_the_most_frequent_pair_merges_first_the_smallest_of_equals_and_never_one_seen_once(self):
        for text, expected in self.MERGES:  # catches: pairs of count 1 queued, the largest or first-seen pair first
            self.assertEqual(quiet(prepare.train_bpe, byte_ids(text), 1000)[0], expected, text)

    def test_meta_json_hashes_the_tokens_and_the_tokenizer_so_a_checkpoint_knows_its_data(self):
        def hash_of(text, tokenizer='char'):
            pathlib.Path(self.input).write_text(text, encoding='utf-8')
            return quiet(prepare.prepare, self.input, os.path.join(self.dir, 'other'), tokenizer, 300)['hash']
        shifted = ''.join(chr(ord(ch) + 1) for ch in TEXT)  # other characters in the same order: the same ids
        self.assertEqual(hash_of(TEXT), self.meta['hash'])  # the same text, tokenized the same way
        self.assertNotEqual(hash_of(TEXT[::-1]), self.meta['hash'])  # the same characters in another text
        self.assertNotEqual(hash_of(shifted), self.meta['hash'])  # the same token files, another vocabulary
        self.assertEqual(*(pathlib.Path(d, 'train.bin').read_bytes() for d in (self.data_dir, f'{self.dir}/other')))
        self.assertNotEqual(hash_of(TEXT, 'bpe'), self.meta['hash'])  # the same text as BPE tokens

SVG = '{http://www.w3.org/2000/svg}'  # the namespace of the elements of bench.py's pictures

def sgd_step(model, micro_batches):  # model after one train_step, with SGD at lr 1, on these micro-batches
    micro = iter(micro_batches)
    with mock.patch.multiple(gpt, get_batch=lambda split: next(micro), gradient_accumulation_steps=len(micro_batches),
                             grad_clip=0.0, dtype='float32', device='cpu', learning_rate=1.0, warmup_iters=0):
        gpt.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), 0)
    return model

def two_processes(folder, target, meanwhile=lambda children: None, timeout=60):
    """target(rank) on two forked ranks meeting through a file (no port), meanwhile(children) here: [(code, output)]"""
    from torch import _dynamo  # noqa: F401  imported at an optimizer's first step: here once, not in each child
    init, logs = dist.init_process_group, [f'{folder}/{rank}.log' for rank in range(2)]

    def child(rank):
        os.dup2(os.open(logs[rank], os.O_WRONLY | os.O_CREAT), 1)
        os.dup2(1, 2)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
        dist.init_process_group = lambda backend: init(backend, init_method=f'file://{folder}/rendezvous',
                                                       rank=rank, world_size=2)
        target(rank)
    children = [FORK.Process(target=child, args=(rank,)) for rank in range(2)]
    for process in children:
        process.start()
    meanwhile(children)
    for process in children:
        process.join(timeout)
        process.kill()  # a hang: exit code -9 (nothing to a process that ended)
        process.join()
    return [(process.exitcode, pathlib.Path(log).read_text()) for process, log in zip(children, logs)]

class TestScaling(DataDirTest):
    """More rows per step: accumulation and DDP give one large batch's step; torchrun's processes run and end as one."""

    @classmethod
    def setUpClass(cls):  # torchrun takes 5 s, mostly to import torch 3 times: it runs while the other tests do
        cls.data = DataDirTest()
        cls.data.setUp()  # a folder of its own, with data
        cls.addClassCleanup(cls.data.doCleanups)
        cls.torchrun = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                         '--nproc_per_node=2', os.path.join(HERE, 'gpt.py'), *cls.data.train_args(
                                             max_iters=4, lr_decay_iters=4, gradient_accumulation_steps=2)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cls.addClassCleanup(cls.torchrun.communicate, timeout=120)  # if no test waited for it: it ends by itself

    def test_accumulating_micro_batches_on_one_process_or_under_ddp_on_two_equals_one_step_on_them_all(self):
        x, y = torch.randint(11, (2, 8, 8), generator=torch.Generator().manual_seed(1))  # 8 rows of 8 tokens
        b = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]  # 4 micro-batches of 2 rows: under DDP, 2 on each

        def ddp_step(rank):  # same weights on each (tiny_model's seed); gradients averaged after its last micro-batch
            dist.init_process_group('gloo')
            torch.save(sgd_step(DDP(tiny_model().train()), b[2 * rank:2 * rank + 2]).module.state_dict(),
                       f'{self.dir}/{rank}.pt')
            gc.collect()  # the process group goes in destroy_process_group, not at exit
            dist.barrier()
            dist.destroy_process_group()
        ended = two_processes(self.dir, ddp_step)
        self.assertEqual([code for code, _ in ended], [0, 0], ended)
        one = sgd_step(tiny_model().train(), [(x, y)]).state_dict()
        accumulated = sgd_step(tiny_model().train(), b).state_dict()  # four micro-batches on one process
        for stepped in (accumulated, *(torch.load(f'{self.dir}/{rank}.pt', weights_only=True) for rank in range(2))):
            torch.testing.assert_close(stepped, one, atol=1e-6, rtol=0)
        self.assertFalse(all(torch.equal(one[k], v) for k, v in tiny_model().state_dict().items()))  # it moved

    def test_under_torchrun_each_process_trains_on_its_own_batches_and_a_rank_repeats_its_own(self):
        self.use_data(seed=1337, gradient_accumulation_steps=1, learning_rate=0.0, min_lr=0.0)  # no step moves it
        model, losses = tiny_model(vocab_size=self.meta['vocab_size'], block_size=16), []
        for rank in (0, 1, 2, 3, 0, 1):
            torch.rand(rank + 3)  # whatever ran before in the process: the step's own seed decides
            with mock.patch.object(gpt, 'rank', rank):  # the same step on each process; its loss tells its rows
                losses.append(gpt.train_step(model, torch.optim.SGD(model.parameters()), 5).item())
        self.assertEqual((len(set(losses[:4])), losses[4:]), (4, losses[:2]))  # ranks: other rows; a rank: its own

    def test_torchrun_with_two_cpu_processes_trains_and_saves_a_checkpoint_sample_py_reads(self):
        stdout, stderr = self.torchrun.communicate(timeout=120)  # process 0 alone evaluates and reports: once
        self.assertEqual((self.torchrun.returncode, stdout.count('iter 4: train loss')), (0, 1), stderr[-2000:])
        self.assertEqual(torch.load(f'{self.data.dir}/out/last.pt', weights_only=True)['iter_num'], 4)
        code, out, err = cli('sample.py', [f'--out_dir={self.data.dir}/out', '--start=Sing', '--num_samples=1',
                                           '--max_new_tokens=5', '--device=cpu'])
        self.assertEqual((code, err, len(out), out[:4]), (0, '', 10, 'Sing'))  # 'Sing', 5 characters, newline

    def test_a_finished_ddp_run_tears_its_process_group_down_before_exit(self):
        # else DDP (in a reference cycle) keeps gloo's group to exit; torn down there, a rank still connected: SIGABRT
        dist.init_process_group('gloo', init_method=f'file://{self.dir}/rendezvous', rank=0, world_size=1)
        self.addCleanup(lambda: dist.is_initialized() and dist.destroy_process_group())
        alive, destroy = [], dist.destroy_process_group

        def counted_destroy():  # what is left of DDP when main() tears the group down
            alive.append(sum(type(o) is DDP for o in gc.get_objects()))
            destroy()
        gc.collect()
        gc.disable()  # no collection by chance: what main() itself does decides
        self.addCleanup(gc.enable)
        with mock.patch.dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='2'), \
                mock.patch.multiple(dist, init_process_group=mock.DEFAULT, destroy_process_group=counted_destroy), \
                mock.patch.multiple(gpt, rank=0, world_size=1):
            code = cli('gpt.py', self.train_args(max_iters=2, lr_decay_iters=2, eval_interval=2))[0]
        self.assertEqual((code, alive), (0, [0]))  # main() took our group of one for torchrun's

    def test_a_stop_under_torchrun_is_taken_within_one_step_on_every_process(self):
        """Two processes get SIGTERM past their first eval, far from a log or eval step (a vote there only would train
        on), process 1 two steps before process 0: both stop at process 1's next step or the one after; 0 saves it."""
        args = self.train_args(max_iters=10 ** 5, lr_decay_iters=10 ** 5, eval_interval=10 ** 5, log_interval=10 ** 5)
        begun, train_step, signalled = [f'{self.dir}/begun_{rank}' for rank in range(2)], gpt.train_step, []

        def slow_step(*args):  # (model, optimizer, it), 50 ms each, noted in begun[rank]: a signal comes mid-run
            with open(begun[gpt.rank], 'a') as f:
                f.write(f'{args[-1]}\n')
            time.sleep(0.05)
            return train_step(*args)

        def sigterm_once_both_train(children):
            while not all(map(os.path.exists, begun)) and all(p.is_alive() for p in children):
                time.sleep(0.01)
            signalled.append(len(pathlib.Path(begun[0]).read_text().split()))  # steps process 0 had begun
            os.kill(children[1].pid, signal.SIGTERM)
            signalled.append(len(pathlib.Path(begun[0]).read_text().split()))  # before and after the signal
            time.sleep(0.1)
            os.kill(children[0].pid, signal.SIGTERM)  # it may have stopped already: a process not yet waited for
        with mock.patch.object(gpt, 'train_step', slow_step):
            (code0, printed), (code1, _) = two_processes(self.dir, lambda rank: gpt.run_cli(gpt.main, args),
                                                         sigterm_once_both_train, timeout=20)
        self.assertEqual((code0, code1), (128 + 15, 128 + 15), printed[-2000:])
        n = int(re.search(r'stopped by SIGTERM at iter (\d+)', printed)[1])
        self.assertEqual([len(pathlib.Path(p).read_text().split()) for p in begun], [n, n])  # steps 0..n-1 each
        self.assertTrue(signalled[0] <= n <= signalled[1] + 2, (signalled, n))
        self.assertEqual(torch.load(f'{self.dir}/out/last.pt', weights_only=True)['iter_num'], n)
        gpt.load_model(f'{self.dir}/out/last.pt')

class ForkedGPT:
    """Popen for bench.py target's `python gpt.py args`: gpt.py in a fork (no 2 s import), lines through a pipe."""
    last = None  # the latest one, for a test to see how it was started and how it ended

    def __init__(self, argv, **kwargs):
        self.argv, (read, write) = argv, os.pipe()

        def child():
            sys.stdout = sys.stderr = open(write, 'w', buffering=1)
            gpt.run_cli(gpt.main, argv[2:])
        self.process = FORK.Process(target=child)
        self.process.start()
        os.close(write)
        self.stdout, self.kill, ForkedGPT.last = open(read), self.process.kill, self

    def wait(self):
        self.process.join()
        return self.process.exitcode

class TestBench(DataDirTest):
    """bench.py: one-line refusals, the loss chart, runs that clean up after themselves, and bench.py gpu's table."""
    REFUSED = [  # bench.py's arguments -> what its one line names
        ('train --iters=0', '--iters=0'), ('train --repeats=0', '--repeats=0'), ('train --warmup=-1', '--warmup=-1'),
        ('sample --new_tokens=0', '--new_tokens=0'), ('sample --n_head=5', '--n_head=5'), ('gpu --dry=maybe', '--dry'),
        ('sample --vocab_size=0', '--vocab_size=0'), ('target --limit_s=0', '--limit_s=0'), ('trian', '--help'),
        ('target --target_loss=nan', 'nan'), ('target --out_dir=x', '--out_dir'),
        ('train --init_from=resume', '--init_from'), ('', 'python bench.py {train|target|sample|plot|attention|gpu}')]
    HEAD, EVALS = 'iter,train_loss,val_loss,val_bpc,lr\n', '0,4.0,4.1,5.9,0.001\n6,3.0,3.1,4.4,0.001\n'
    LOGS = {  # log.csv -> the evals plot draws (None: refused), and what the chart, stdout or stderr then holds
        'a log step, and step 6 again after a resume': (HEAD + EVALS + '1,3.9,,,0.002\n12,2.0,2.1,3.0,0.0001\n'
                                                        '6,9.0,9.5,9.9,0.001\n', 3, '>9.50<'),  # the top: 9.5
        "a spreadsheet's byte-order mark": ('\ufeff' + HEAD + EVALS, 2, 'best val loss 3.1000 at iter 6'),
        'a loss of inf or nan': (HEAD + EVALS.replace('6,3.0', '6,inf') + '12,2.0,nan,3.0,0.001\n', 1,
                                 'left out the evals at iter 6, 12: a loss of nan or inf'),
        'a lone quote': (HEAD + EVALS.replace('6,', '6,"') + '12,2.0,2.1,3.0,0.001\n', None, 'cannot be read as a'),
        'a short row': (HEAD + '0,4.0,4.1\n', None, 'cannot be read as a gpt.py log')}
    FIGURES = {'time_startup': [{'import_s': 1.5, 'init_s': 0.5}],  # what each step of bench.py gpu returns, per call
               'bench_target': [{'first_line_s': 3.0, 'first_step_s': 9.0, 'first_step_iter': 50, 'target_s': 25.0}],
               'bench_train': [{'ms': 11.0, 'first_s': 12.0, 'mfu': 40.0, 'peak_gib': 3.0}, {'ms': 20.0}],
               'bench_sample': [{'tokens_per_s': 2500.0, 'speedup': 3.0, 'same_text': True}],
               'cuda_tests': [{'ran': 5, 'passed': 5, 'skipped': 0, 'compiled': 'passed'}]}
    ROWS = {  # figure -> its value, target and verdict in that table
        'training step at the reference size, compiled, ms/iter': ['11.0', '<= 12 (nanoGPT: 17.8)', 'met'],
        'first step, compiling from a cold cache, s': ['12.0', '<= 10', 'MISSED'],
        'training step, eager, ms/iter': ['20.0', '', ''],
        'generation with the KV cache, batch 1, tokens/s': ['2,500', '>= 3,000', 'MISSED'],
        'CUDA unit tests (test_gpt.TestCUDA) passed': ['5 of 5', 'all', 'met'],
        'compiled and eager losses within tolerance (TestCUDA)': ['passed', 'passed', 'met']}
    REPORTS = {  # (TestCUDA's compiled test passes, all skipped) -> bench.cuda_tests's ran, passed, skipped, compiled
        (True, False): (2, 2, 0, 'passed'), (False, False): (2, 1, 0, 'failed'), (True, True): (2, 0, 2, 'skipped')}

    def run_tiny(self, mode, *args, **settings):  # bench.py train or target, tiny, gpt.py forked: (code, out, err)
        tiny = dict(data_dir=self.data_dir, device='cpu', n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                    eval_iters=2, warmup_iters=2, max_iters=10 ** 5, lr_decay_iters=10 ** 5)
        os.makedirs(f'{self.dir}/tmp', exist_ok=True)  # its temporary folders
        with mock.patch.object(tempfile, 'tempdir', f'{self.dir}/tmp'), mock.patch.dict(gpt.__dict__), \
                mock.patch.object(subprocess, 'Popen', ForkedGPT):  # gpt as it was, after bench.py train's setup
            return cli('bench.py', [mode, *(f'--{k}={v}' for k, v in (tiny | settings).items()), *args])

    def plot(self, log):  # bench.py plot of this log.csv: (exit code, what it printed, the chart, points per line)
        pathlib.Path(self.dir, 'out').mkdir(exist_ok=True)
        pathlib.Path(self.dir, 'out', 'log.csv').write_text(log, encoding='utf-8')
        code, out, err = cli('bench.py', ['plot', f'--out_dir={self.dir}/out'])
        svg = pathlib.Path(self.dir, 'out', 'loss.svg').read_text() if code == 0 else ''
        lines = ElementTree.fromstring(svg).iter(f'{SVG}polyline') if svg else []  # well-formed XML
        return code, out + err, svg, [len(line.get('points').split()) for line in lines]

    def gpu_table(self, **figures):  # bench.py gpu --dry=true, its steps returning FIGURES: (code, rows, stderr)
        steps = {name: mock.Mock(side_effect=returns) for name, returns in {**self.FIGURES, **figures}.items()}
        with mock.patch.multiple(bench, **steps):
            code, out, err = cli('bench.py', ['gpu', '--dry=true'])
        rows = [[cell.strip() for cell in line.strip().strip('|').split('|')] for line in out.split('## All figures')[1]
                .splitlines() if line.startswith('| ') and not line.startswith('| --')]  # a Markdown table's
        return code, {row[0]: row[1:] for row in rows}, err

    def test_bench_settings_that_cannot_work_end_in_one_line_naming_the_setting(self):
        for args, named in self.REFUSED:
            code, out, err = cli('bench.py', args.split())
            self.assertEqual((code, out, len(err.splitlines())), (2, '', 1), (args, err))
            self.assertTrue(err.startswith('error: ') and named in err, (args, err))
        self.assertEqual(sorted(os.listdir(self.dir)), ['data', 'input.txt'])  # nothing was written

    def test_bench_help_lists_every_mode_with_its_keys_and_exits_0(self):
        code, out, err = cli('bench.py', ['--help'])
        for mode in ('train', 'target', 'sample', 'plot', 'attention', 'gpu'):  # each with its dict: bench.TRAIN ...
            self.assertIn(f'\n{mode}:', out)
            for key, value in getattr(bench, mode.upper()).items():
                self.assertRegex(out, rf"--{key}={re.escape(repr(value))} +\S")  # with what it means
        self.assertEqual((code, err, cli('bench.py', ['train', '--help'])[:2]), (0, '', (0, out)))  # a mode's too

    def test_bench_plot_draws_one_point_per_eval_leaves_out_non_finite_losses_and_refuses_a_broken_row(self):
        for name, (log, evals, said) in self.LOGS.items():
            code, printed, svg, lines = self.plot(log)
            drawn = (2, []) if evals is None else (0, [evals, evals])  # train and val
            self.assertEqual((code, lines, len(printed.splitlines())), (*drawn, 1), name)  # one line, either way
            self.assertIn(said, printed + svg, name)
            self.assertNotIn('nan', svg, name)

    def test_bench_plot_into_a_folder_it_cannot_write_ends_in_one_line(self):
        os.makedirs(f'{self.dir}/out/loss.svg')  # as root, chmod would not stop the write: a folder in its way does
        code, printed, _, _ = self.plot(self.HEAD + self.EVALS)
        self.assertEqual((code, printed.count('\n')), (2, 1))
        self.assertTrue(printed.startswith(f'error: cannot write {self.dir}/out/loss.svg (Is a directory); make'))

    def test_bench_train_and_target_leave_no_temporary_folder_behind(self):
        cache = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
        code, out, err = self.run_tiny('train', '--iters=2', '--warmup=1', '--repeats=1')
        self.assertEqual((code, err, 'ms/iter (median)' in out), (0, '', True))
        code, out, err = self.run_tiny('target', '--target_loss=100', eval_interval=3, log_interval=1)
        self.assertEqual((code, err, ForkedGPT.last.argv[:2]), (0, '', [sys.executable, gpt.__file__]))
        self.assertEqual((os.listdir(f'{self.dir}/tmp'), os.environ.get('TORCHINDUCTOR_CACHE_DIR')), ([], cache))
        self.assertRegex(out, r'\| val loss <= 100.0: reached at iter 0 \(val loss \d\.\d+\) +\| \d+\.\d +\|')
        self.assertRegex(out, r'\| first step line \(iter -, compile included\) +\| - +\|')  # stopped before any step
        self.assertRegex(out, r'\n +\d+\.\d\d s  iter 0: train loss ')  # each line, time-stamped

    def test_bench_target_reports_a_target_gpt_py_never_reaches_and_passes_on_the_line_of_a_setting_it_refuses(self):
        code, out, err = self.run_tiny('target', '--target_loss=0.01', max_iters=6, eval_interval=3, log_interval=1)
        self.assertEqual((code, err), (0, ''))  # gpt.py ended by itself, after its eval at iter 6
        self.assertRegex(out, r'\| val loss <= 0.01: not reached: gpt.py ended with exit code 0 +\| - +\|')
        self.assertRegex(out, r'\| first step line \(iter 1, compile included\) +\| \d+\.\d +\|')
        code, _, err = self.run_tiny('target', n_head=3)
        self.assertEqual((code, err), (2, 'error: --n_embd=16 must be a multiple of --n_head=3\n'))

    def test_ctrl_c_during_bench_target_stops_gpt_py_and_deletes_its_folder(self):
        folders = []  # how many temporary folders there were while gpt.py trained

        def print_then_ctrl_c(*args, **kwargs):  # Ctrl-C once bench.py echoes gpt.py's first eval
            print(*args, **kwargs)
            if ' s  iter 0: ' in args[0]:
                folders.append(len(os.listdir(f'{self.dir}/tmp')))
                os.kill(os.getpid(), signal.SIGINT)
        self.addCleanup(signal.signal, signal.SIGINT, signal.signal(signal.SIGINT, signal.default_int_handler))
        with mock.patch('bench.print', print_then_ctrl_c, create=True):
            code, _, err = self.run_tiny('target', '--target_loss=0.01', max_iters=300)  # 2 s, unless stopped
        self.assertEqual((code, err, folders), (130, 'error: stopped by Ctrl-C\n', [1]))
        self.assertEqual((os.listdir(f'{self.dir}/tmp'), ForkedGPT.last.wait()), ([], -signal.SIGKILL))  # killed

    def test_cuda_tests_are_counted_from_the_unittest_report_and_the_compiled_test_found(self):
        self.assertIn(bench.COMPILE_TEST, unittest.defaultTestLoader.getTestCaseNames(TestCUDA))
        for (compiled_passes, skipped), counts in self.REPORTS.items():
            cuda = unittest.skipIf(skipped, 'needs a CUDA GPU')(type('TestCUDA', (unittest.TestCase,), {
                bench.COMPILE_TEST: lambda test: test.assertTrue(compiled_passes), 'test_another': lambda test: None}))
            report = io.StringIO()  # what `python -m unittest -v` prints for these two tests
            unittest.TextTestRunner(report, verbosity=2).run(unittest.defaultTestLoader.loadTestsFromTestCase(cuda))
            with mock.patch.object(subprocess, 'run', return_value=subprocess.CompletedProcess(
                    [], 0, '', report.getvalue())) as ran:
                self.assertEqual(quiet(bench.cuda_tests), dict(zip(['ran', 'passed', 'skipped', 'compiled'], counts)))
            self.assertIn('test_gpt.TestCUDA', ran.call_args[0][0])

    def test_bench_gpu_puts_every_figure_against_its_target_in_one_table(self):
        code, rows, err = self.gpu_table()
        self.assertEqual((code, err, len(rows)), (0, '', 16))  # the header and 15 figures
        self.assertEqual({figure: rows[figure] for figure in self.ROWS}, self.ROWS)
        rows = self.gpu_table(bench_target=[{'first_line_s': 3.0, 'iter': 2000, 'val': 1.4812}])[1]  # missed
        self.assertEqual(rows["card's command: val loss <= 3.6, s"],
                         ['not reached (last eval: iter 2000, val 1.4812)', '<= 60', 'MISSED'])

    def test_bench_gpu_still_prints_its_table_when_a_step_fails_and_then_exits_with_one_line(self):
        code, rows, err = self.gpu_table(bench_sample=RuntimeError('CUDA error: out of memory'))
        self.assertIn('RuntimeError: CUDA error: out of memory', err)  # its traceback, and one line at the end
        self.assertEqual((code, err.splitlines()[-1]), (1, 'error: KV cache and recompute give the same text; '
                                                           'a step failed: see its traceback above'))
        self.assertEqual([rows['generation with the KV cache, batch 1, tokens/s'], rows['KV cache and recompute give '
                          'the same text']], [['failed', '>= 3,000', 'MISSED'], ['failed', 'yes', 'MISSED']])
        self.assertEqual(rows['training step at the reference size, compiled, ms/iter'][2], 'met')

def cells(root):  # the (layer, head, t, s) of every cell drawn, in order, read from the lines of their paths
    found = []
    for group in root.iterfind(f'.//{SVG}g[@data-head]'):  # a head's heatmap
        l, h = map(int, group.get('data-head').split(','))
        for s, t, n in re.findall(r'M(\d+) (\d+)h(\d+)', ' '.join(p.get('d') for p in group.iter(f'{SVG}path'))):
            found += [(l, h, int(t), int(s) + i) for i in range(int(n))]
    return sorted(found)

def texts(root):
    return [''.join(e.itertext()) for e in root.iter(f'{SVG}text')]

class TestAttentionPicture(DataDirTest):
    """bench.py attention: every head's weights on a prompt, drawn as heatmaps with a caption each."""
    NOTHING_TO_DRAW = [  # vocabulary, n_layer, --start -> what bench.py says instead of drawing
        ('ab', 0, 'abba', 'has no attention to draw: it is a bigram model'),
        ('ab', 2, 'abzax', "error: characters not in the model's vocabulary: 'xz'; remove them\n"),
        ('ab', 2, 'a', "error: --start='a' is too short")]

    def draw(self, start, vocab=None, merges=None, n_layer=2, n_head=2):
        """bench.py attention on a tiny random model's ckpt.pt: (exit code, stdout, stderr, the SVG's root or None)"""
        tokenizer = {'kind': 'char', 'vocab': list(vocab)} if vocab else {'kind': 'bpe', 'merges': merges}
        model = tiny_model(gpt.load_tokenizer(tokenizer).vocab_size, 32, n_layer, n_head, 8 * n_head)  # block_size 32
        torch.save({'model': model.state_dict(), 'model_args': model.config._asdict(), 'tokenizer': tokenizer},
                   f'{self.dir}/ckpt.pt')
        code, out, err = cli('bench.py', ['attention', f'--out_dir={self.dir}', f'--start={start}'])
        svg = f'{self.dir}/attention.svg'
        return code, out, err, ElementTree.parse(svg).getroot() if os.path.exists(svg) else None

    def test_the_svg_holds_one_cell_per_head_row_and_earlier_token(self):
        code, out, _, root = self.draw('hello there', sorted(set('hello there')), n_head=3)
        self.assertEqual(cells(root), sorted((l, h, t, s) for l in range(2) for h in range(3) for t in range(11)
                                             for s in range(t + 1)))  # each once
        self.assertEqual((code, out.count('\n| '), 'wrote ' in out), (0, 2 * 3 + 2, True))  # a row per head
        self.assertLess(os.path.getsize(f'{self.dir}/attention.svg'), 10 ** 6)

    def test_weights_are_the_softmax_of_each_blocks_own_queries_and_keys(self):
        model, queries_and_keys = tiny_model(vocab_size=13, block_size=16, n_head=4, n_embd=32, seed=1), []
        for block in model.blocks:  # what each block's heads get: q and k, (1, nh, T, hs) each
            block.attn.heads.register_forward_pre_hook(lambda head, args: queries_and_keys.append(args[:2]))
        weights, later = bench.attention_weights(model, torch.randint(13, (1, 10))), torch.ones(10, 10).triu(1) > 0
        self.assertTrue((weights[..., later] == 0).all())  # later tokens (s > t) get nothing, exactly
        self.assertTrue(all(block.attn.heads.flash for block in model.blocks))  # the fast path is back
        for block_weights, (q, k) in zip(weights, queries_and_keys, strict=True):
            scores = (q[0] @ k[0].transpose(1, 2) / math.sqrt(8)).masked_fill(later, -math.inf)  # (nh, T, T)
            torch.testing.assert_close(block_weights, scores.softmax(dim=-1))  # so each row sums to 1

    def test_labels_show_each_token_as_decoded_with_markup_multibyte_characters_and_bpe_merges(self):
        prompt = 'a&b<c"d é\n日'
        _, out, _, root = self.draw(prompt, sorted(set(prompt)), n_layer=1, n_head=1)
        self.assertTrue({'&', '<', '"', 'é', '日', '␣', '⏎'} <= set(texts(root)))
        self.assertIn('a&b<c"d␣é⏎日', out)  # the prompt, as the picture's first line shows it
        root = self.draw('the cat & the hat', merges=[[ord('t'), ord('h')], [256, ord('e')]])[3]  # th, the: 13 tokens
        self.assertEqual((len(cells(root)), {'the', '&'} <= set(texts(root))), (2 * 2 * 13 * 14 // 2, True))

    def test_a_model_or_prompt_with_nothing_to_draw_says_why_in_one_line_and_draws_nothing(self):
        for vocab, n_layer, start, said in self.NOTHING_TO_DRAW:
            code, out, err, root = self.draw(start, vocab, n_layer=n_layer)
            self.assertEqual((len((out + err).splitlines()), root, said in out + err), (1, None, True), start)

    def test_a_prompt_past_the_limit_keeps_its_last_part_and_says_so(self):
        prompt = 'ab' * 30 + 'xyz'  # 63 characters, over the model's block_size of 32
        _, out, _, root = self.draw(prompt, 'abxyz')
        self.assertIn('The prompt has 63 tokens: only its last 32 are shown', out)
        self.assertTrue(any('only its last 32' in text for text in texts(root)))
        self.assertEqual({t for _, _, t, _ in cells(root)}, set(range(32)))
        first = next(g for g in root.iter(f'{SVG}g') if g.get('font-family') == 'monospace')  # a head's labels
        self.assertEqual(''.join(e.text for e in first)[:32], prompt[-32:])  # its rows: the last 32 tokens

    def test_captions_name_the_pattern_a_head_follows_with_its_share(self):
        words, T = list('To be, or not to be:\nthat is'), 28  # a newline at token 20
        previous = torch.eye(T)[(torch.arange(T) - 1).clamp(min=0)]  # row t reads token t - 1; row 0 itself
        mixed = 0.7 * bench.tokens_back(2)(words).float() + 0.3 * previous  # 70% on 2 tokens back, 30% on 1
        mixed[:2] = previous[:2]  # rows 0 and 1 have no token 2 back: the share counts the rows that have one
        newline = bench.last_newline(words).float()  # the rows before the first newline read themselves
        newline[:21] = torch.eye(T)[:21]
        even = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]
        for weights, caption in ((previous, ('previous token', 1.0)), (mixed, ('2 tokens back', 0.7)),
                                 (newline, ('the last newline', 1.0)), (even, ('spread evenly', 1.0))):
            name, share = bench.caption(weights, words)
            self.assertEqual((name, round(share, 6)), caption)

class TestCUDASetup(DataDirTest):
    """What gpt.py does on a GPU, checked on the CPU with torch.cuda stubbed (set_device refuses a device without an
    index, as the real one does). A class apart: bench.py gpu counts TestCUDA as not run only where all skip."""
    DTYPES = [((9, 0), 'bfloat16', True), ((8, 0), 'bfloat16', True), ((7, 5), 'float32', True),
              ((6, 1), 'float32', False), (None, 'float32', False)]  # compute capability -> dtype 'auto', compile

    def setup(self, *args, capability=None):  # gpt.setup where there is a GPU of this capability, if one
        self.addCleanup(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
        set_to = []
        stubs = dict(is_available=lambda: capability is not None, get_device_capability=lambda device: capability,
                     set_device=lambda d: set_to.append(torch.cuda._utils._get_device_index(d, optional=False)))
        with mock.patch.multiple(torch.cuda, **stubs):
            gpt.setup(gpt.parse_args([f'--data_dir={self.data_dir}', f'--out_dir={self.dir}/out', *args],
                                     gpt.DEFAULTS, gpt.__file__))
        return set_to

    def test_the_cards_command_on_a_gpu_sets_an_indexed_device_and_trains_the_reference_model(self):
        self.assertEqual((self.setup('--n_layer=6', '--device=cuda', capability=(9, 0)), gpt.device), ([0], 'cuda:0'))
        self.assertEqual({k: getattr(gpt, k) for k in gpt.GPU_RECIPE}, gpt.GPU_RECIPE)
        self.setup('--n_layer=2', '--batch_size=8', capability=(9, 0))  # 'auto' picks the GPU; given settings stay
        self.assertEqual((gpt.device, gpt.n_layer, gpt.batch_size, gpt.n_embd), ('cuda:0', 2, 8, 384))
        self.setup()
        self.assertEqual((gpt.device, gpt.n_layer, gpt.n_embd, gpt.block_size), ('cpu', 2, 128, 64))  # CPU defaults

    def test_bfloat16_only_where_the_gpu_has_it_and_compile_only_where_triton_can(self):
        for capability, dtype, compiled in self.DTYPES:  # the last on the CPU, as the test before ends
            self.setup(capability=capability)
            self.assertEqual((gpt.dtype, gpt.compile), (dtype, compiled), capability)

    def test_compiling_each_block_changes_no_step_and_no_checkpoint_key(self):
        real_compile, steps = torch.compile, {}
        with mock.patch.object(torch, 'compile', lambda fn, **kw: real_compile(fn, backend='eager', **kw)):
            for compiled in (True, False):
                self.use_data(compile=compiled, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
                model, optimizer = gpt.build(self.meta['vocab_size'])
                steps[compiled] = [gpt.train_step(model, optimizer, it).item() for it in range(3)]
                self.assertEqual([b._compiled_call_impl is not None for b in model.blocks], [compiled] * 2)
                self.assertFalse(any('_orig_mod' in k for k in model.state_dict()))
        torch.testing.assert_close(steps[True], steps[False], atol=1e-5, rtol=0)

@unittest.skipUnless(torch.cuda.is_available(), 'needs a CUDA GPU (bench.py gpu runs these on one)')
class TestCUDA(DataDirTest):
    """On a real GPU: fused attention, the KV cache and its CUDA graph, compiled training, a checkpoint to the CPU."""

    def test_fused_attention_equals_the_written_out_head_math_in_bfloat16(self):
        idx = torch.randint(11, (4, 8), device='cuda')
        with torch.autocast('cuda', torch.bfloat16):
            fused, explicit = (tiny_model(flash=f).cuda()(idx)[0].float() for f in (True, False))
        self.assertLess((fused - explicit).abs().max().item(), 2e-2)  # bfloat16 keeps about 3 significant digits

    def test_compiled_and_eager_training_give_close_losses(self):
        logs = [cli('gpt.py', self.train_args(f'c{c}', device='cuda', dtype='float32', compile=c))[1]
                for c in (True, False)]
        a, b = ([float(x) for x in re.findall(r"iter \d+/\d+: loss (\S+),", log)] for log in logs)
        self.assertTrue(len(a) == 12 and all(abs(x - y) < 1e-2 for x, y in zip(a, b)), (a, b))

    def test_a_checkpoint_saved_on_cuda_loads_on_the_cpu_and_samples(self):
        self.assertEqual(cli('gpt.py', self.train_args(device='cuda', max_iters=4, lr_decay_iters=4))[0], 0)
        code, out, _ = cli('sample.py', [f'--out_dir={self.dir}/out', '--start=Sing', '--num_samples=1',
                                         '--max_new_tokens=20', '--device=cpu'])  # load_model maps it to the CPU
        self.assertTrue(code == 0 and out.startswith('Sing') and len(out) > 20, out)

    def test_kv_cache_and_its_cuda_graph_match_full_recompute_past_block_size_and_under_beam_search(self):
        model, idx = tiny_model(block_size=8).cuda(), torch.randint(11, (2, 3), device='cuda')
        cache = sample.KVCache(model.config)
        for _ in range(20):  # past block_size: the window moves and the cache is refilled
            cached, full = sample.next_logits(model, idx, cache), sample.next_logits(model, idx)
            self.assertLess((cached - full).abs().max().item(), 1e-4)
            idx = torch.cat((idx, cached.argmax(-1, keepdim=True)), dim=1)
        self.assertIsNotNone(cache.graph)  # the one-token steps replay a captured graph
        texts = [sample.sample(model, idx, 40, temperature=0, use_cache=c) for c in (True, False)]
        beams = [sample.beam_search(model, idx[:1], 25, beams=4, use_cache=c) for c in (True, False)]
        self.assertTrue(torch.equal(*texts) and torch.equal(*beams))
