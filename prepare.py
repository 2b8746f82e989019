"""
Turn a UTF-8 text file into the token ids gpt.py trains on.

    python prepare.py [--input=input.txt] [--data_dir=data]

Writes data_dir/train.bin (the first 90% of the tokens) and data_dir/val.bin (the last 10%) as uint16,
and data_dir/meta.json: the vocabulary and the token counts. The text is read in chunks, twice (once for
the vocabulary, once to encode it), so memory stays small whatever the size of the file.
"""
import json
import os
import sys
import urllib.request

import numpy as np

from gpt import UserError, parse_args, run_cli

input = 'input.txt'  # the UTF-8 text to train on; Tiny Shakespeare is downloaded if the default is missing
data_dir = 'data'  # where train.bin, val.bin and meta.json are written

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
MIN_CHARS = 100  # below this the 10% val split is too small to mean anything
CHUNK = 1 << 24  # characters read at a time


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


def read_chunks(path):
    """The text of `path`, CHUNK characters at a time, decoded as strict UTF-8 (line endings kept)."""
    with open(path, encoding='utf-8', newline='') as f:
        while chunk := f.read(CHUNK):
            yield chunk


def prepare(input_path, data_dir):
    """Write train.bin, val.bin and meta.json for the text in input_path; returns the meta dict."""
    if not os.path.isfile(input_path):
        raise UserError(f"--input={input_path} does not exist; pass the path of a UTF-8 text file")
    chars, n = set(), 0
    try:
        for chunk in read_chunks(input_path):  # pass 1: the vocabulary, and the length of the text
            chars.update(chunk)
            n += len(chunk)
    except UnicodeDecodeError as e:
        raise UserError(f"{input_path} is not UTF-8 text (byte {e.object[e.start]:#04x} of a chunk cannot be "
                        f"decoded); convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if n < MIN_CHARS:
        raise UserError(f"{input_path} has {n} characters; it needs at least {MIN_CHARS} to train and validate on")
    if len(chars) > 65535:
        raise UserError(f"{input_path} has {len(chars)} distinct characters; uint16 token ids allow at most 65535")
    vocab = sorted(chars)
    lookup = np.zeros(ord(vocab[-1]) + 1, dtype=np.uint16)  # code point -> token id
    lookup[[ord(ch) for ch in vocab]] = np.arange(len(vocab))
    os.makedirs(data_dir, exist_ok=True)
    n_train = int(n * 0.9)
    paths = {split: os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')}
    with open(paths['train'] + '.tmp', 'wb') as train, open(paths['val'] + '.tmp', 'wb') as val:
        done = 0
        for chunk in read_chunks(input_path):  # pass 2: encode, the first 90% to train, the rest to val
            ids = lookup[np.frombuffer(chunk.encode('utf-32-le'), dtype=np.uint32)]
            cut = min(max(n_train - done, 0), len(ids))
            ids[:cut].tofile(train)
            ids[cut:].tofile(val)
            done += len(ids)
    for path in paths.values():
        os.replace(path + '.tmp', path)
    meta = {'tokenizer': {'kind': 'char', 'vocab': vocab}, 'vocab_size': len(vocab), 'source': input_path,
            'train_tokens': n_train, 'val_tokens': n - n_train}
    with open(os.path.join(data_dir, 'meta.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    print(f"{input_path}: {n:,} characters, vocabulary of {len(vocab)}; wrote {n_train:,} train and "
          f"{n - n_train:,} val tokens to {data_dir}/")
    return meta


def main(argv):
    defaults = {'input': input, 'data_dir': data_dir}
    config = {**defaults, **parse_args(argv, defaults, __file__)}
    if config['input'] == defaults['input'] and not os.path.exists(config['input']):
        download_shakespeare(config['input'])
    prepare(config['input'], config['data_dir'])


if __name__ == '__main__':
    run_cli(main)
