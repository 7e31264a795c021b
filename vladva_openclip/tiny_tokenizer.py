"""Builds the tokenizers the tiny models ship with (``assets/tokenizers/<name>/tokenizer.json``).

The tiny models must run on machines with no hub access, so their tokenizers are trained here, offline and
deterministically, as byte-level BPEs (any text tokenizes, nothing is ever unknown) on a small corpus: the
synthetic world's vocabulary, open_clip's ImageNet class names and templates, and common English words.
Special tokens mirror the real families so the same code paths run: LLaVA-1.5 (``<s> </s> <unk> <pad> <image>``)
and Qwen2-VL (``<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|>``).

Rebuild with ``python -m vladva_openclip.tiny_tokenizer`` (the shipped files are its output).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tokenizers"
VOCAB_SIZE = 2048

SPECIAL_TOKENS: dict[str, list[str]] = {
    "tiny-llava": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "tiny-qwen2vl": [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
        "<|video_pad|>",
    ],
}
# Which special token plays which role, per family (ids are looked up from the built tokenizer).
ROLES: dict[str, dict[str, str]] = {
    "tiny-llava": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    "tiny-qwen2vl": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
}

_WORDS = """
a an the of in on at to and or with without above below left right top bottom middle center centre corner next
near far beside between behind front over under one two three four five six seven eight nine ten several many
few some all each every is are was were be been has have had it its this that these those there here image
photo picture sentence summary word words describe description above scene shows showing contains containing
small large big tiny huge medium little wide tall short long round square circle triangle star cross diamond
hexagon pentagon ring heart oval rectangle ellipse line dot shape shapes object objects red green blue yellow
orange purple pink brown black white gray grey cyan magenta teal navy olive maroon gold silver colour color
coloured colored background plain textured striped dotted light dark bright pale solid outline filled empty
frame picture edge upper lower side positioned placed located sits lies appears drawn painted visible
USER ASSISTANT system user assistant You are a helpful
""".split()

# Every word of the synthetic world's captions (vladva_openclip.synth), weighted up in the corpus so that each is a
# single token: the tiny models read and write these captions, and a colour or shape split into byte pieces
# (" p" + "urple") is both slower (longer sequences) and harder for a 2-layer LLM to compose.
_SCENE_WORDS = """
a an the of in on at to and is are has its it this there these we can see from with over under above below left
right top bottom center corner corners side sides frame image picture drawing shows showing contains drawn placed
located appears stands visible nothing else only other apart empty completely single one two three four five six
object objects shape shapes small large circle square triangle star diamond hexagon round equal straight sharp
pointed tips perfectly red green blue yellow purple orange pink cyan white beige light dark gray background plain
texture pattern stripes diagonal dots checkerboard grainy speckled slightly faint
""".split()
_SCENE_WEIGHT = 40


def _corpus() -> list[str]:
    import open_clip

    lines = [" ".join(_WORDS), " ".join(w.capitalize() for w in _WORDS)]
    lines += [" " + " ".join(_SCENE_WORDS), " " + " ".join(w.capitalize() for w in _SCENE_WORDS)] * _SCENE_WEIGHT
    lines += list(open_clip.IMAGENET_CLASSNAMES)
    lines += [t("{}") if callable(t) else str(t) for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    lines += [
        "Summary above image in one word:", "Summary above sentence in one word:",
        "a photo of a small red circle left of a large blue square.",
        "In the image there is a green triangle in the top left corner and a yellow star on the right.",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 , . ; : ! ? ' \" ( ) - / \n",
    ]
    return lines * 4


def build_tiny_tokenizer(name: str, out_dir: Path | None = None) -> Path:
    """Train the byte-level BPE of tiny model family ``name`` and write ``tokenizer.json`` + config files.

    Returns:
        The directory written, loadable with ``transformers.AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if name not in SPECIAL_TOKENS:
        raise ValueError(f"unknown tiny tokenizer {name!r}; known: {sorted(SPECIAL_TOKENS)}")
    out_dir = Path(out_dir) if out_dir is not None else ASSET_DIR / name
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS[name], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **ROLES[name])
    fast.padding_side = "right"
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    _logger.info("wrote %s (%d tokens)", out_dir, len(fast))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for name in SPECIAL_TOKENS:
        build_tiny_tokenizer(name, args.out / name)


if __name__ == "__main__":
    main()
