"""CLIP tokenizers without downloads: the small generated one the demo models use, and the real 49408-token one,
picked by a text encoder's vocabulary size. Used by `checkpoints` when it derives a single file's folder, by the
component loaders and by the demo models.

The real vocabulary comes with the install: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, 1.3 MB) is package data
in `nodes/engine/data/` (licence beside it), so a user's first SD1.x/SD2/SDXL single file runs offline. It is the
file CLIP-L and OpenCLIP (SD2's and SDXL's second encoder) both use. `$NODEGRAPH_CLIP_BPE` may name another copy.

`missing_tokenizer(path)` says, from a file's header alone, which tokenizer its text encoders would lack (a
vocabulary of another size, a T5 without its tokenizer): the loaders report it at validation (`missing_tokenizer`).
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nodes.engine.checkpoints import MissingTokenizerError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
BUNDLED_CLIP_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"


def tokenizer_for(path: Path, vocab_size: int, pad_token: str) -> CLIPTokenizer:
    if vocab_size == demo_vocab_size():
        return demo_clip_tokenizer(pad_token)
    if vocab_size == CLIP_VOCAB_SIZE:
        return real_clip_tokenizer(path, pad_token)
    raise MissingTokenizerError(
        path, f"text encoder has a {vocab_size}-token vocabulary; no tokenizer of that size is known"
    )


def bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet in CLIP's vocabulary order: the printable bytes as themselves, then the
    other bytes as code points from 256 up (the order matters: it fixes the real vocabulary's ids)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def _base_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocabulary order: bytes, bytes ending a word, one token per merge, then the two specials."""
    alphabet = bytes_to_unicode()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


# Words the demo tokenizer encodes as single tokens; every other text falls back to byte tokens.
_DEMO_WORDS = (
    "a an the of in on with and photo painting portrait landscape cat dog bird horse tree house city "
    "mountain river sea sky sunset night forest flower red blue green yellow black white golden style "
    "oil watercolor sketch detailed high quality blurry ugly"
).split()


def _demo_merges() -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for word in _DEMO_WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
    return merges


def demo_vocab_size() -> int:
    """Vocabulary size of the generated demo tokenizer (the demo text encoders use exactly this)."""
    return len(_demo_merges()) + 2 * 256 + 2


def demo_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A working CLIP tokenizer with a small byte-level BPE vocabulary generated here (no files needed)."""
    merges = _demo_merges()
    return _clip_tokenizer(_base_vocab(merges), merges, pad_token)


def _clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    # merges must be (left, right) tuples: tokenizers 0.23 rejects the "left right" strings that
    # CLIPTokenizer's annotation suggests.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)  # type: ignore[arg-type]


def real_clip_tokenizer(path: Path, pad_token: str) -> CLIPTokenizer:
    """The real 49408-token CLIP tokenizer from local files, or a `MissingTokenizerError` saying how to get it.

    Looked for, in order: `$NODEGRAPH_CLIP_BPE` (a `bpe_simple_vocab_16e6.txt.gz`), the copy this package carries,
    one inside an installed `open_clip` package, and an `openai/clip-vit-large-patch14` snapshot in the HF cache.
    """
    from transformers import CLIPTokenizer

    for bpe in _clip_bpe_candidates():
        if bpe.is_file():
            return clip_tokenizer_from_bpe(bpe, pad_token)
    for snapshot in hf_cache_snapshots("openai/clip-vit-large-patch14"):
        if (snapshot / "tokenizer.json").is_file() or (snapshot / "vocab.json").is_file():
            tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(snapshot, local_files_only=True)
            tokenizer.pad_token = pad_token
            return tokenizer
    raise MissingTokenizerError(
        path,
        f"needs the real CLIP BPE vocabulary (49408 tokens), which nodegraph ships as {BUNDLED_CLIP_BPE.name}, "
        "but that file is missing from this install: reinstall nodegraph, or set NODEGRAPH_CLIP_BPE to a copy of "
        "it (OpenAI's CLIP repository; open-clip-torch ships one too)",
    )


def clip_vocabulary_found(vocab_size: int) -> bool:
    """Whether `tokenizer_for` has a tokenizer of this size, without building it."""
    if vocab_size == demo_vocab_size():
        return True
    if vocab_size != CLIP_VOCAB_SIZE:
        return False
    return any(bpe.is_file() for bpe in _clip_bpe_candidates()) or any(
        (s / "tokenizer.json").is_file() or (s / "vocab.json").is_file()
        for s in hf_cache_snapshots("openai/clip-vit-large-patch14"))


def missing_tokenizer(path: Path) -> str | None:
    """What tokenizer a model file's text encoders would lack offline, from its header alone (naming the file, not
    its folders), or None: every CLIP vocabulary of the file (`…token_embedding.weight`), and a T5's (`shared` or
    `encoder.embed_tokens`). A diffusers folder carries its tokenizers; an unreadable file is the loader's to
    report."""
    from nodes.engine.checkpoints import CheckpointError, read_header

    if path.is_dir():
        return None
    try:
        shapes = read_header(path).shapes
    except CheckpointError:
        return None
    for key, shape in shapes.items():
        if key.endswith("token_embedding.weight") and shape and not clip_vocabulary_found(shape[0]):
            return (f"{path.name}: its CLIP text encoder has a {shape[0]}-token vocabulary; no tokenizer of that "
                    "size is known" + ("" if shape[0] != CLIP_VOCAB_SIZE else
                                       f" offline ({BUNDLED_CLIP_BPE.name} is missing from this install: reinstall "
                                       "nodegraph, or set NODEGRAPH_CLIP_BPE to a copy)"))
        if key in ("shared.weight", "encoder.embed_tokens.weight") and shape:
            from nodes.engine.component_files import t5_tokenizer_found

            if not t5_tokenizer_found(shape[0]):
                return (f"{path.name}: a T5 text encoder with a {shape[0]}-token vocabulary needs T5's tokenizer, "
                        "not found offline: set NODEGRAPH_T5_TOKENIZER to a folder with its tokenizer.json or "
                        "spiece.model, or place google/t5-v1_1-xxl's in the HF cache")
    return None


def _clip_bpe_candidates() -> list[Path]:
    found = [Path(p) for p in [os.environ.get("NODEGRAPH_CLIP_BPE", "")] if p]
    found.append(BUNDLED_CLIP_BPE)
    # Look for open_clip's data file without importing open_clip (importing it pulls in torchvision etc.).
    found += [Path(entry) / "open_clip" / "bpe_simple_vocab_16e6.txt.gz" for entry in sys.path if entry]
    return found


def hf_cache_snapshots(repo: str) -> list[Path]:
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"), "hub"
    )
    folder = Path(hub) / ("models--" + repo.replace("/", "--")) / "snapshots"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def clip_tokenizer_from_bpe(bpe_gz: Path, pad_token: str) -> CLIPTokenizer:
    """Build the CLIP tokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (as CLIP itself does)."""
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    # The first line is a version header; CLIP keeps exactly as many merges as fill a 49408 vocabulary.
    count = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : count + 1])]
    if len(merges) != count:
        raise MissingTokenizerError(bpe_gz, f"expected {count} merges, found {len(merges)}")
    return _clip_tokenizer(_base_vocab(merges), merges, pad_token)
