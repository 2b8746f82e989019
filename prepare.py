"""
Turn a UTF-8 text file into the token ids gpt.py trains on.

    python prepare.py [--input=input.txt] [--data_dir=data]             # characters
    python prepare.py --tokenizer=bpe --vocab_size=1024 --data_dir=data-bpe  # byte-level BPE

Splits the text into its first 90% of characters (train) and the last 10% (val), and writes their token
ids to data_dir/train.bin and data_dir/val.bin as uint16, and data_dir/meta.json: the tokenizer and the
token and character counts. For characters the text is read in chunks, twice (once for the vocabulary,
once to encode it), so memory stays small whatever the size of the file.
"""
import json
import os
import sys
import urllib.request

import numpy as np

from gpt import BPETokenizer, CharTokenizer, UserError, merge, parse_args, run_cli  # noqa: F401

input = 'input.txt'  # the UTF-8 text to train on; Tiny Shakespeare is downloaded if the default is missing
data_dir = 'data'  # where train.bin, val.bin and meta.json are written
tokenizer = 'char'  # 'char': one token per character; 'bpe': byte-level BPE learned on the train split
vocab_size = 1024  # for bpe: 256 byte values + (vocab_size - 256) learned merges

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
MIN_CHARS = 100  # below this the 10% val split is too small to mean anything
CHUNK = 1 << 22  # characters read at a time: memory stays bounded whatever the size of the file


# Byte-level BPE: applying the merges (gpt.py's load_tokenizer builds this tokenizer for a bpe meta.json),
# then learning them (train_bpe, below).

def download_shakespeare(path):
    print(f"{path} not found: downloading Tiny Shakespeare from {SHAKESPEARE_URL}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"{path} is missing and the download failed ({getattr(e, 'reason', e)}); save "
                        f"{SHAKESPEARE_URL} as {path} by hand, or pass --input=YOUR_TEXT.txt") from None
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)


def read_chunks(path, progress=''):
    """The text of `path`, CHUNK characters at a time, decoded as strict UTF-8 (line endings kept).
    For a file of several chunks, `progress` names the pass in a line that counts the characters read."""
    done = 0
    with open(path, encoding='utf-8', newline='') as f:
        while chunk := f.read(CHUNK):
            yield chunk
            done += len(chunk)
            if progress and done > CHUNK:
                print(f"\r{progress}: {done:,} characters", end='', flush=True)
    if progress and done > CHUNK:
        print()


def train_bpe(ids, vocab_size):
    """Learn vocab_size - 256 merges on the byte ids of the train text: each time, the most frequent pair of
    neighbouring ids becomes a new id. Returns the merges and the train text's final ids."""
    merges = []
    for new_id in range(256, vocab_size):
        counts = np.bincount(ids[:-1].astype(np.int64) * new_id + ids[1:])  # pair (a, b) -> a * new_id + b
        if counts.max() < 2:  # no pair repeats: more merges would not shorten the text
            break
        pair = divmod(int(counts.argmax()), new_id)
        ids = merge(ids, pair, new_id)
        merges.append(pair)
        if len(merges) % 128 == 0:
            print(f"  {len(merges)} merges, the train text is down to {len(ids):,} tokens")
    return merges, ids


def write_split(data_dir, train_ids, val_ids):
    for split, ids in (('train', train_ids), ('val', val_ids)):
        path = os.path.join(data_dir, f'{split}.bin')
        np.asarray(ids, dtype=np.uint16).tofile(path + '.tmp')
        os.replace(path + '.tmp', path)


def prepare(input_path, data_dir, tokenizer='char', vocab_size=1024):
    """Write train.bin, val.bin and meta.json for the text in input_path; returns the meta dict."""
    if not os.path.isfile(input_path):
        raise UserError(f"--input={input_path} does not exist; pass the path of a UTF-8 text file")
    if tokenizer == 'bpe' and not 256 < vocab_size <= 8192:  # counting pairs takes vocab_size**2 counters
        raise UserError(f"--vocab_size={vocab_size} must be between 257 and 8192 for bpe (256 bytes + merges)")
    chars, n = set(), 0
    try:
        for chunk in read_chunks(input_path, 'pass 1 of 2, vocabulary'):  # and the length of the text
            chars.update(chunk)
            n += len(chunk)
    except UnicodeDecodeError as e:
        raise UserError(f"{input_path} is not UTF-8 text (byte {e.object[e.start]:#04x} cannot be decoded); "
                        f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if n < MIN_CHARS:
        raise UserError(f"{input_path} has {n} characters; it needs at least {MIN_CHARS} to train and validate on")
    if tokenizer == 'char' and len(chars) > 65535:
        raise UserError(f"{input_path} has {len(chars)} distinct characters; uint16 token ids allow at most 65535; "
                        "use --tokenizer=bpe")
    os.makedirs(data_dir, exist_ok=True)
    meta_path = os.path.join(data_dir, 'meta.json')
    if os.path.exists(meta_path):  # until the new one is written, the folder is marked incomplete
        os.remove(meta_path)
    n_train = int(n * 0.9)  # characters in the train split
    if tokenizer == 'bpe':
        text = ''.join(read_chunks(input_path))
        train_bytes = np.frombuffer(text[:n_train].encode('utf-8'), dtype=np.uint8).astype(np.int32)
        merges, train_ids = train_bpe(train_bytes, vocab_size)
        tok, tok_meta = BPETokenizer(merges), {'kind': 'bpe', 'merges': [list(pair) for pair in merges]}
        write_split(data_dir, train_ids, tok.encode(text[n_train:]))
    else:
        tok = CharTokenizer(sorted(chars))
        tok_meta = {'kind': 'char', 'vocab': tok.vocab}
        lookup = np.zeros(ord(tok.vocab[-1]) + 1, dtype=np.uint16)  # code point -> token id
        lookup[[ord(ch) for ch in tok.vocab]] = np.arange(tok.vocab_size)
        paths = {split: os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')}
        with open(paths['train'] + '.tmp', 'wb') as train, open(paths['val'] + '.tmp', 'wb') as val:
            done = 0
            for chunk in read_chunks(input_path, 'pass 2 of 2, encoding'):  # the first 90% to train, the rest to val
                ids = lookup[np.frombuffer(chunk.encode('utf-32-le'), dtype=np.uint32)]
                cut = min(max(n_train - done, 0), len(ids))
                ids[:cut].tofile(train)
                ids[cut:].tofile(val)
                done += len(ids)
        for path in paths.values():
            os.replace(path + '.tmp', path)
    sizes = {split: os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // 2 for split in ('train', 'val')}
    meta = {'tokenizer': tok_meta, 'vocab_size': tok.vocab_size, 'source': input_path,
            'train_tokens': sizes['train'], 'val_tokens': sizes['val'], 'train_chars': n_train, 'val_chars': n - n_train}
    with open(meta_path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(meta_path + '.tmp', meta_path)
    print(f"{input_path}: {n:,} characters, {tokenizer} vocabulary of {tok.vocab_size}; wrote {sizes['train']:,} "
          f"train and {sizes['val']:,} val tokens to {data_dir}/")
    return meta


def main(argv):
    defaults = {'input': input, 'data_dir': data_dir, 'tokenizer': tokenizer, 'vocab_size': vocab_size}
    config = {**defaults, **parse_args(argv, defaults, __file__)}
    if config['tokenizer'] not in ('char', 'bpe'):
        raise UserError(f"--tokenizer={config['tokenizer']} must be char or bpe")
    if config['input'] == defaults['input'] and not os.path.exists(config['input']):
        download_shakespeare(config['input'])
    prepare(config['input'], config['data_dir'], config['tokenizer'], config['vocab_size'])


if __name__ == '__main__':
    run_cli(main)
