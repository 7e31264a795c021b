"""The world: samples (image + short caption + long caption) and evaluation items, all pure functions of
(config.seed, split, index).

Every purpose (scene, short caption, long caption, paraphrase, negatives) draws from its own random stream, so
changing, say, the negative generator never changes the training images or captions.
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .captions import LONG_STYLES, SHORT_STYLES, CaptionSpec, paraphrase_spec, realise, sample_short_spec
from .config import WorldConfig
from .negatives import SUGARCREPE_SUBSETS, make_negatives
from .render import render_scene
from .scene import Scene, sample_scene, scene_rng
from .winoground import WinogroundExample, make_winoground_example


@dataclass(frozen=True)
class Sample:
    """One scene with its captions.

    Attributes:
        split, index: where it comes from.
        scene: the scene graph.
        spec: structured form of ``short``.
        binding: for each noun phrase of ``spec``, the index of the scene object it names.
        short: the short caption (contrastive target).
        long: the long description (next-token target).
    """

    split: str
    index: int
    scene: Scene
    spec: CaptionSpec
    binding: tuple[int, ...]
    short: str
    long: str


class World:
    """Deterministic generator of the synthetic compositional world.

    Example::

        world = World(WorldConfig(seed=0))
        s = world.sample("train", 5)
        img = world.render(s.scene)          # PIL RGB, config.image_size squared
        negs = world.negatives(s)            # {"replace_obj": "...", ...}
    """

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()

    def scene(self, split: str, index: int) -> Scene:
        return sample_scene(self.config, split, index)

    def sample(self, split: str, index: int, short_captions: str | None = None) -> Sample:
        """Scene ``index`` of ``split`` with its captions. ``short_captions`` overrides the style of the short
        caption (default: ``config.short_captions`` for the train split, ``detailed`` for the test split)."""
        scene = self.scene(split, index)
        cfg = self.config
        style = short_captions or (cfg.short_captions if split == "train" else "detailed")
        if style not in SHORT_STYLES:
            raise ValueError(f"unknown short-caption style {style!r}; known: {', '.join(SHORT_STYLES)}")
        # The detailed style keeps the stream it always had, so the detailed world's captions never change.
        stream = "short" if style == "detailed" else f"short-{style}"
        spec, binding = SHORT_STYLES[style](scene, cfg, scene_rng(cfg.seed, split, index, stream))
        long = LONG_STYLES[cfg.long_captions](scene, cfg, scene_rng(cfg.seed, split, index, "long"))
        return Sample(split=split, index=index, scene=scene, spec=spec, binding=binding, short=realise(spec),
                      long=long)

    def text_pair(self, split: str, index: int) -> tuple[str, str]:
        """A detailed caption of the scene and its SugarCrepe++-style paraphrase (same facts, other words): the
        positive pairs of text-only (E5-V-style) contrastive training."""
        s = self.sample(split, index, short_captions="detailed")
        return s.short, self.paraphrase(s)

    def render(self, scene: Scene) -> Image.Image:
        return render_scene(scene, self.config)

    def paraphrase(self, sample: Sample) -> str:
        """SugarCrepe++'s ``caption2``: same facts as ``sample.short``, different wording."""
        rng = scene_rng(self.config.seed, sample.split, sample.index, "paraphrase")
        return realise(paraphrase_spec(sample.spec, rng))

    def negatives(self, sample: Sample, kinds: tuple[str, ...] = SUGARCREPE_SUBSETS) -> dict[str, str]:
        """Hard negatives of ``sample.short`` by SugarCrepe type, each false for the scene (types that do not
        apply to this scene are absent)."""
        rng = scene_rng(self.config.seed, sample.split, sample.index, "negatives")
        return {k: realise(v) for k, v in make_negatives(sample.spec, sample.scene, self.config, rng, kinds).items()}

    def retrieval_captions(self, sample: Sample) -> list[str]:
        """Up to ``config.captions_per_image`` distinct true short captions: the sample's own, its paraphrase,
        then re-drawn phrasings."""
        out = [sample.short, self.paraphrase(sample)]
        for attempt in range(4 * self.config.captions_per_image):
            if len(out) >= self.config.captions_per_image:
                break
            rng = scene_rng(self.config.seed, sample.split, sample.index, f"retrieval-{attempt}")
            text = realise(sample_short_spec(sample.scene, self.config, rng)[0])
            if text not in out:
                out.append(text)
        return out[: self.config.captions_per_image]

    def winoground(self, index: int) -> WinogroundExample:
        return make_winoground_example(self.config, index)
