"""
Turn a UTF-8 text file into the token ids gpt.py trains on.

    python prepare.py [--input=input.txt] [--data_dir=data]                  # characters
    python prepare.py --tokenizer=bpe --vocab_size=1024 --data_dir=data-bpe  # byte-level BPE

Splits the text into its first 90% of characters (train) and the last 10% (val), and writes their token
ids to data_dir/train.bin and data_dir/val.bin as uint16, and data_dir/meta.json: the tokenizer and the
token and character counts. Characters are read in chunks, so memory stays small whatever the size of the
file; BPE learns its merges on the whole train split, in memory (about 150 MB per MB of text).
"""
import array, collections, hashlib, heapq, json, os, urllib.request  # noqa: E401

import numpy as np

from gpt import BPETokenizer, CharTokenizer, UserError, parse_args, run_cli, say

input = 'input.txt'  # the UTF-8 text to train on; Tiny Shakespeare is downloaded if the default is missing
data_dir = 'data'  # the folder train.bin, val.bin and meta.json are written to (made if missing)
tokenizer = 'char'  # 'char': one token per character; 'bpe': byte-level BPE learned on the train split
vocab_size = 1024  # bpe: 256 bytes + vocab_size - 256 merges, up to 8192; 1 MB of text: ~3 s at 1024, ~5 s at 8192

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
MIN_CHARS = 100  # below this the 10% val split is too small to mean anything
CHUNK = 1 << 22  # characters read at a time: memory stays bounded whatever the size of the file


def download_shakespeare(path):
    say(f"{path} not found: downloading Tiny Shakespeare from {SHAKESPEARE_URL}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"{path} is missing and the download failed ({getattr(e, 'reason', e)}); save "
                        f"{SHAKESPEARE_URL} as {path} by hand, or prepare a text of your own: "
                        "python prepare.py --input=YOUR_TEXT.txt") from None
    try:
        with open(path + '.tmp', 'wb') as f:
            f.write(data)
        os.replace(path + '.tmp', path)
    except OSError as e:  # a full disk, a read-only folder
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        raise UserError(f"cannot write {path} ({e.strerror}); free some space, or prepare a text of your own: "
                        "python prepare.py --input=YOUR_TEXT.txt") from None


def read_chunks(path, progress=''):
    """The text of `path`, CHUNK characters at a time, decoded as strict UTF-8 (line endings kept).
    For a file of several chunks, `progress` names the pass in a line that counts the characters read."""
    done = 0
    with open(path, encoding='utf-8', newline='') as f:
        while chunk := f.read(CHUNK):
            yield chunk
            done += len(chunk)
            if progress and done > CHUNK:
                say(f"\r{progress}: {done:,} characters", end='')
    if progress and done > CHUNK:
        say()


def train_bpe(ids, vocab_size):
    """Learn vocab_size - 256 merges on the byte ids of the train text: each time, the most frequent pair of
    neighbouring ids (of equal counts, the smallest pair) becomes a new id. Returns the merges, the final ids."""
    # Recounting all pairs after each merge reads the whole text once per merge. But a merge changes only the
    # pairs around what it fuses: merging (a, b) into n turns x a b y into x n y, so (x, a), (a, b) and
    # (b, y) lose one and (x, n), (n, y) gain one. So the text is a linked list (b drops out in O(1)), each
    # pair keeps its count and the positions where it starts, and a heap of (-count, pair) yields the next.
    ids, end = array.array('i', ids.tolist()), len(ids)  # int32 arrays: 4 bytes an item, a list takes 36
    left, right = array.array('i', range(-1, end - 1)), array.array('i', range(1, end + 1))  # -1, end: none
    counts = collections.Counter(zip(ids, ids[1:]))  # 'aaa' holds (a, a) twice: overlapping pairs count
    where = collections.defaultdict(lambda: array.array('i'))  # pair -> positions where it starts or started
    for i, pair in enumerate(zip(ids, ids[1:])):
        where[pair].append(i)
    heap = [(-count, pair) for pair, count in counts.items() if count > 1]  # merging a pair seen once: no gain
    heapq.heapify(heap)
    merges, n_tokens = [], end
    while heap and len(merges) < vocab_size - 256:
        count, pair = heapq.heappop(heap)
        if -count != counts[pair]:  # its count fell since this entry was queued: queue it as it is now
            if counts[pair] > 1:
                heapq.heappush(heap, (-counts[pair], pair))
            continue
        (a, b), new_id, born = pair, 256 + len(merges), set()
        for i in sorted(where.pop(pair)):  # left to right as in encode: in 'aaa' the first two fuse
            j = right[i]
            if ids[i] != a or j == end or ids[j] != b:  # not here any more: an earlier fusion took a or b
                continue
            x, y = left[i], right[j]
            counts[pair] -= 1
            if x >= 0:  # (x, a) becomes (x, n)
                counts[ids[x], a] -= 1
                counts[ids[x], new_id] += 1
                where[ids[x], new_id].append(x)
                born.add((ids[x], new_id))
            if y < end:  # (b, y) becomes (n, y)
                counts[b, ids[y]] -= 1
                counts[new_id, ids[y]] += 1
                where[new_id, ids[y]].append(i)
                born.add((new_id, ids[y]))
                left[y] = i
            ids[i], ids[j], right[i] = new_id, -1, y  # b drops out; -1 marks its position empty
            n_tokens -= 1
        for p in born:  # only pairs with new_id gained, so only they need a new entry
            if counts[p] > 1:
                heapq.heappush(heap, (-counts[p], p))
        merges.append(pair)
        if len(merges) % 64 == 0 or len(merges) == vocab_size - 256:  # a progress line, redrawn in place
            say(f"\rlearning merges: {len(merges):,} of {vocab_size - 256:,}, the train text is down to "
                f"{n_tokens:,} tokens", end='')
    say()
    ids = np.array(ids)
    return merges, ids[ids >= 0]


def data_hash(tok_meta, paths):
    """A fingerprint of the data: SHA-256 of the tokenizer and of both token files. gpt.py stores it in each
    checkpoint, so that a resume on other data (another text, or the same one tokenized otherwise) is refused."""
    h = hashlib.sha256(json.dumps(tok_meta, sort_keys=True).encode('utf-8'))
    for path in paths:
        h.update(b'\0')  # where one file ends and the next begins
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def prepare(input_path, data_dir, tokenizer='char', vocab_size=1024):
    """Write train.bin, val.bin and meta.json for the text in input_path; returns the meta dict."""
    if not os.path.isfile(input_path):  # a folder or a pipe cannot be read twice, as the two passes do
        what = 'does not exist' if not os.path.exists(input_path) else 'is a folder' if os.path.isdir(input_path) \
            else 'is not a regular file (a pipe?)'
        raise UserError(f"--input={input_path} {what}; pass the path of a UTF-8 text file")
    if tokenizer == 'bpe' and not 256 < vocab_size <= 8192:
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
    n_train = int(n * 0.9)  # characters in the train split
    # Every file is written as NAME.tmp, and only once all three are whole do they replace the old ones, meta.json
    # last: a failure before that leaves the folder as it was, and a crash while they are being replaced leaves
    # it without meta.json, which gpt.py reads as incomplete. No failure leaves a .tmp file behind.
    paths = {name: os.path.join(data_dir, name) for name in ('train.bin', 'val.bin', 'meta.json')}
    try:
        os.makedirs(data_dir, exist_ok=True)
        with open(paths['train.bin'] + '.tmp', 'wb') as train, open(paths['val.bin'] + '.tmp', 'wb') as val:
            if tokenizer == 'bpe':
                text = ''.join(read_chunks(input_path))
                train_bytes = np.frombuffer(text[:n_train].encode('utf-8'), dtype=np.uint8).astype(np.int32)
                merges, train_ids = train_bpe(train_bytes, vocab_size)
                tok, tok_meta = BPETokenizer(merges), {'kind': 'bpe', 'merges': [list(pair) for pair in merges]}
                train.write(train_ids.astype(np.uint16))  # not tofile: it can miss a full disk
                val.write(np.array(tok.encode(text[n_train:]), dtype=np.uint16))
            else:
                tok = CharTokenizer(sorted(chars))
                tok_meta = {'kind': 'char', 'vocab': tok.vocab}
                lookup = np.zeros(ord(tok.vocab[-1]) + 1, dtype=np.uint16)  # code point -> token id
                lookup[[ord(ch) for ch in tok.vocab]] = np.arange(tok.vocab_size)
                done = 0
                for chunk in read_chunks(input_path, 'pass 2 of 2, encoding'):  # 90% to train, the rest to val
                    ids = lookup[np.frombuffer(chunk.encode('utf-32-le'), dtype=np.uint32)]
                    cut = min(max(n_train - done, 0), len(ids))
                    train.write(ids[:cut])
                    val.write(ids[cut:])
                    done += len(ids)
        sizes = {split: os.path.getsize(paths[f'{split}.bin'] + '.tmp') // 2 for split in ('train', 'val')}
        meta = {'tokenizer': tok_meta, 'vocab_size': tok.vocab_size, 'source': input_path, 'train_tokens':
                sizes['train'], 'val_tokens': sizes['val'], 'train_chars': n_train, 'val_chars': n - n_train,
                'hash': data_hash(tok_meta, [paths['train.bin'] + '.tmp', paths['val.bin'] + '.tmp'])}
        with open(paths['meta.json'] + '.tmp', 'w', encoding='utf-8') as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
        if os.path.exists(paths['meta.json']):  # until the new one is in place, the folder is marked incomplete
            os.remove(paths['meta.json'])
        for path in paths.values():
            os.replace(path + '.tmp', path)
    except OSError as e:  # a full disk, a read-only folder, a file of that name...
        reason = 'a file has that name' if os.path.isfile(data_dir) else e.strerror
        raise UserError(f"cannot write to {data_dir}/ ({reason}); free some space, make it writable or pass "
                        "another --data_dir") from None
    finally:
        for path in paths.values():
            if os.path.exists(path + '.tmp'):
                os.remove(path + '.tmp')
    say(f"{input_path}: {n:,} characters, {tokenizer} vocabulary of {tok.vocab_size}; wrote {sizes['train']:,} "
          f"train and {sizes['val']:,} val tokens to {data_dir}/")
    return meta


def main(argv):
    defaults = {'input': input, 'data_dir': data_dir, 'tokenizer': tokenizer, 'vocab_size': vocab_size}
    if {'-h', '--help'} & set(argv):
        say(__doc__.strip() + '\n')
    config = {**defaults, **parse_args(argv, defaults, __file__)}
    if config['tokenizer'] not in ('char', 'bpe'):
        raise UserError(f"--tokenizer={config['tokenizer']} must be char or bpe")
    if config['input'] == defaults['input'] and not os.path.exists(config['input']):
        download_shakespeare(config['input'])
    prepare(config['input'], config['data_dir'], config['tokenizer'], config['vocab_size'])


if __name__ == '__main__':
    run_cli(main)
