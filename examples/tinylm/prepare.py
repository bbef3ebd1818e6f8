"""
tinylm data preparation and evaluation. FIXED: the agent must not edit this file.

Builds a byte-level language-modelling dataset from a vendored corpus (the top-level
modules of the CPython 3.11 standard library, PSF licence in data/LICENSE-PSF.txt),
offline and deterministically: the same bytes on every host, pinned by sha256. The held-out
text the verifier scores is not here: it ships with the runner, which writes it where only
the verifier reads it (runner.yaml, `heldout:`).

    python prepare.py          # builds ~/.cache/autoresearch/tinylm (idempotent)

Exports for train.py: TIME_BUDGET, MAX_SEQ_LEN, VOCAB_SIZE, make_dataloader, evaluate_bpb.
"""

import hashlib
import json
import lzma
import math
import os

# ---------------------------------------------------------------------------
# Constants (fixed)
# ---------------------------------------------------------------------------

TIME_BUDGET = int(os.environ.get("AUTORESEARCH_TIME_BUDGET", "60"))  # seconds of training
MAX_SEQ_LEN = 256          # bytes; the longest context train.py may use
EVAL_TOKENS = 65536        # bytes of the validation split scored by evaluate_bpb
EVAL_BATCH_SIZE = 16       # sequences per evaluation forward pass
VOCAB_SIZE = 256           # byte-level tokenizer: one token per byte
VAL_EVERY_NTH_FILE = 10    # every 10th corpus file (sorted order) is validation data, the rest train
SPLITS = "v3: val i%10==0"  # a cache made by another split is made again

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_PATH = os.path.join(HERE, "data", "cpython-3.11-stdlib.txt.xz")
CORPUS_XZ_SHA256 = "065ea45f634f82c54096d9fecb37c93d824080b23b803ad0ebe0e88487268d51"
CORPUS_TEXT_SHA256 = "acbef7dda90f496e9bf3c98bc570113b4db0fe87d89fa0314eb62455c27d563f"
FILE_MARKER = b"# ===== file: "

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "autoresearch", "tinylm")
MANIFEST_NAME = "manifest.json"

# ---------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _split_corpus(text):
    """Split the corpus at its file markers into train and val (every VAL_EVERY_NTH_FILE-th file
    is validation)."""
    starts = []
    pos = text.find(FILE_MARKER)
    while pos != -1:
        starts.append(pos)
        pos = text.find(FILE_MARKER, pos + 1)
    starts.append(len(text))
    splits = {"train": [], "val": []}
    for i in range(len(starts) - 1):
        kind = "val" if i % VAL_EVERY_NTH_FILE == 0 else "train"
        splits[kind].append(text[starts[i]:starts[i + 1]])
    return {kind: b"".join(chunks) for kind, chunks in splits.items()}


def _read_manifest(cache_dir):
    try:
        with open(os.path.join(cache_dir, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_is_valid(cache_dir, manifest):
    if not manifest or manifest.get("corpus_text_sha256") != CORPUS_TEXT_SHA256 or manifest.get("splits") != SPLITS:
        return False
    for name, digest in manifest["files"].items():
        try:
            with open(os.path.join(cache_dir, name), "rb") as f:
                if _sha256(f.read()) != digest:
                    return False
        except OSError:
            return False
    return True


def prepare(cache_dir=CACHE_DIR):
    """Build the train/val byte files, tokenizer description and manifest. Idempotent."""
    if _cache_is_valid(cache_dir, _read_manifest(cache_dir)):
        print(f"cache ok: {cache_dir}")
        return
    with open(CORPUS_PATH, "rb") as f:
        packed = f.read()
    if _sha256(packed) != CORPUS_XZ_SHA256:
        raise SystemExit(f"corpus {CORPUS_PATH} does not match its pinned sha256; restore it from git")
    text = lzma.decompress(packed)
    if _sha256(text) != CORPUS_TEXT_SHA256:
        raise SystemExit("decompressed corpus does not match its pinned sha256")
    splits = _split_corpus(text)
    tokenizer = json.dumps({"type": "bytes", "vocab_size": VOCAB_SIZE}, sort_keys=True).encode()
    files = {"train.bin": splits["train"], "val.bin": splits["val"]}
    _write_cache(cache_dir, {**files, "tokenizer.json": tokenizer})
    print(f"prepared {cache_dir}: " + ", ".join(f"{name} {len(data):,} bytes" for name, data in files.items()))


def _write_cache(cache_dir, files):
    os.makedirs(cache_dir, exist_ok=True)
    for name, data in files.items():
        tmp = os.path.join(cache_dir, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(cache_dir, name))
    manifest = {
        "corpus": os.path.basename(CORPUS_PATH),
        "corpus_text_sha256": CORPUS_TEXT_SHA256,
        "splits": SPLITS,
        "files": {name: _sha256(data) for name, data in files.items()},
        "bytes": {name: len(data) for name, data in files.items()},
    }
    tmp = os.path.join(cache_dir, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(cache_dir, MANIFEST_NAME))


# ---------------------------------------------------------------------------
# Runtime utilities imported by train.py
# ---------------------------------------------------------------------------


def _load_split(split):
    import torch

    path = os.path.join(CACHE_DIR, f"{split}.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `python prepare.py` (or `runner prepare`) first")
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()


def make_dataloader(batch_size, seq_len, device, seed=0):
    """Yield endless (x, y) batches of random training windows; y is x shifted by one byte."""
    import torch

    assert seq_len <= MAX_SEQ_LEN, f"seq_len {seq_len} exceeds MAX_SEQ_LEN {MAX_SEQ_LEN}"
    data = _load_split("train")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        windows = data[starts[:, None] + offsets]
        yield windows[:, :-1].contiguous().to(device), windows[:, 1:].contiguous().to(device)


def evaluate_bpb(model, device, seq_len=MAX_SEQ_LEN):
    """Bits per byte of `model` on the first EVAL_TOKENS bytes of the validation split.

    `model(idx)` must return logits of shape (batch, time, VOCAB_SIZE). Summed nats over target
    bytes / (ln 2 x target bytes), as autoresearch computes it. Lower is better.
    """
    import torch
    import torch.nn.functional as F

    data = _load_split("val")[: EVAL_TOKENS + 1]
    n_windows = (len(data) - 1) // seq_len
    total_nats, total_bytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in range(0, n_windows, EVAL_BATCH_SIZE):
            starts = torch.arange(b, min(b + EVAL_BATCH_SIZE, n_windows)) * seq_len
            idx = starts[:, None] + torch.arange(seq_len + 1)
            windows = data[idx].to(device)
            x, y = windows[:, :-1], windows[:, 1:]
            logits = model(x).float()
            total_nats += F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1), reduction="sum").item()
            total_bytes += y.numel()
    model.train()
    return total_nats / (math.log(2) * total_bytes)


if __name__ == "__main__":
    prepare()
